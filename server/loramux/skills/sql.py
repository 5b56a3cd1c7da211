"""Text-to-SQL over a small fixed schema, scored by execution.

Schema (SQLite, built in memory from fixed rows for every query):
    departments(id, name, city, budget)                       -- 20 rows
    employees(id, name, department_id, salary, hire_year, title)  -- 100 rows

Scoring runs the predicted query and the reference query on that database and
compares their result sets: as multisets of rows (order ignored) unless the question
asks for an order, then as lists. Column names are ignored, the number of columns is
not, numbers compare by value (5 == 5.0, floats to 6 decimals). So a *different*
query that returns the same rows is counted right — e.g. `salary >= 52000` for "more
than 52000" when nobody earns exactly 52000. That is the property execution accuracy
measures; every reference query returns at least one row (tested), so an empty
answer is never right by accident.

Predicted SQL is untrusted. It runs on a private in-memory database with
- an authorizer that allows only reading (SELECT, column reads, functions, recursive
  CTEs) and denies everything else: writes, DDL, ATTACH, PRAGMA, transactions;
- `PRAGMA query_only` as a second lock, and no extension loading;
- a progress handler that interrupts the query after `QUERY_TIMEOUT_S`;
- caps on string/blob length and on the number of rows fetched.
Any error or refusal scores 0.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from collections import Counter

from loramux.skills.tasks import Example, Intent, TemplateTask, strip_fences

QUERY_TIMEOUT_S = 2.0
MAX_ROWS = 5000
MAX_VALUE_BYTES = 1_000_000
PROGRESS_EVERY = 1000  # SQLite VM instructions between timeout checks

SYSTEM = (
    "SQLite tables: employees(id, name, department_id, salary, hire_year, title), "
    "departments(id, name, city, budget). Answer with one SQL query."
)

CITIES = (
    "Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami", "Dallas", "Portland",
    "Atlanta", "Phoenix",
)
DEPARTMENTS = (
    "Sales", "Marketing", "Engineering", "Finance", "Legal", "Support", "Research",
    "Operations", "Design", "Security", "Logistics", "Training", "Procurement", "Quality",
    "Facilities", "Compliance", "Analytics", "Payroll", "Recruiting", "Media",
)
TITLES = (
    "Engineer", "Manager", "Analyst", "Clerk", "Director", "Technician", "Consultant",
    "Designer", "Accountant", "Specialist",
)
FIRST = (
    "Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kira", "Liam", "Maya", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tara",
)
LAST = (
    "Adams", "Berg", "Costa", "Dahl", "Evans", "Fischer", "Garcia", "Holm", "Ito", "Jensen",
    "Klein", "Lopez", "Moreau", "Novak", "Ortiz", "Petrov", "Quist", "Rossi", "Silva", "Tan",
)
YEARS = tuple(range(2000, 2025))
NUM_EMPLOYEES = 100
ROWS_SEED = 20240501  # the database is fixed forever; the data seed never changes it


def build_rows() -> tuple[tuple[tuple, ...], tuple[tuple, ...]]:
    """(departments, employees) rows. Every department, city, title and year is used;
    salaries are distinct so "the k highest paid" has one answer."""
    rng = random.Random(ROWS_SEED)
    departments = [
        (i + 1, name, CITIES[i % len(CITIES)], rng.randrange(2, 40) * 50_000)
        for i, name in enumerate(DEPARTMENTS)
    ]
    names = [f"{f} {last}" for f in FIRST for last in LAST]
    rng.shuffle(names)
    salaries = rng.sample(range(30_000 // 250, 160_000 // 250), NUM_EMPLOYEES)
    employees = []
    for i in range(NUM_EMPLOYEES):
        dept = i % len(DEPARTMENTS) if i < 60 else rng.randrange(len(DEPARTMENTS))
        year = YEARS[i % len(YEARS)] if i < 50 else rng.choice(YEARS)
        title = TITLES[i % len(TITLES)] if i < 30 else rng.choice(TITLES)
        employees.append((i + 1, names[i], dept + 1, salaries[i] * 250, year, title))
    return tuple(departments), tuple(employees)


DEPARTMENT_ROWS, EMPLOYEE_ROWS = build_rows()  # immutable; built once at import


class SqlRefused(Exception):
    """The query was denied, timed out, or returned too much."""


def connect() -> sqlite3.Connection:
    """A fresh in-memory database with the fixed rows, locked for reading."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.execute("CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, city TEXT, "
                 "budget INTEGER)")
    conn.execute("CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, "
                 "department_id INTEGER REFERENCES departments(id), salary INTEGER, "
                 "hire_year INTEGER, title TEXT)")
    conn.executemany("INSERT INTO departments VALUES (?, ?, ?, ?)", DEPARTMENT_ROWS)
    conn.executemany("INSERT INTO employees VALUES (?, ?, ?, ?, ?, ?)", EMPLOYEE_ROWS)
    conn.execute("PRAGMA query_only = ON")
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES)
    conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 100_000)
    conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_authorize)
    return conn


_ALLOWED = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
            sqlite3.SQLITE_RECURSIVE}


def _authorize(action, arg1, arg2, db_name, trigger) -> int:
    return sqlite3.SQLITE_OK if action in _ALLOWED else sqlite3.SQLITE_DENY


def run_query(conn: sqlite3.Connection, query: str, timeout_s: float = QUERY_TIMEOUT_S):
    """Rows of one read-only statement; raises SqlRefused or sqlite3.Error."""
    deadline = time.monotonic() + timeout_s
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), PROGRESS_EVERY)
    try:
        cursor = conn.execute(query)
        rows = cursor.fetchmany(MAX_ROWS + 1)
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e):
            raise SqlRefused(f"query ran past {timeout_s} s") from e
        raise
    finally:
        conn.set_progress_handler(None, 0)
    if len(rows) > MAX_ROWS:
        raise SqlRefused(f"query returned more than {MAX_ROWS} rows")
    return [tuple(_normalize(v) for v in row) for row in rows]


def _normalize(value):
    return round(value, 6) if isinstance(value, float) else value


_STATEMENT_START = re.compile(r"\b(SELECT|WITH)\b", re.I)


def extract_sql(text: str) -> str:
    """The first complete statement of the reply: fences, leading chatter (up to the
    first SELECT/WITH) and anything after the first complete `;` cut."""
    body = strip_fences(text)
    m = _STATEMENT_START.search(body)
    if m:
        body = body[m.start():]
    for i, ch in enumerate(body):
        if ch == ";" and sqlite3.complete_statement(body[: i + 1]):
            return body[: i + 1].strip()
    return body


def same_result(got: list[tuple], want: list[tuple], ordered: bool) -> bool:
    return got == want if ordered else Counter(got) == Counter(want)


# ---------------------------------------------------------------- intents

JOIN = "FROM employees e JOIN departments d ON e.department_id = d.id"


def _fixed(sql: str, ordered: bool = False):
    """build() for an intent whose reference is `sql` with the slots filled in;
    values whose reference returns no row are rejected (an empty answer would make
    any query that finds nothing right)."""

    def build(values, rng):
        query = sql.format(**values)
        conn = connect()
        try:
            if not run_query(conn, query):
                return None
        finally:
            conn.close()
        return query, {"ordered": ordered}

    return build


INTENTS = (
    Intent("dept_names", (
        "List the names of the employees in the {dept} department.",
        "Who works in {dept}? Give their names.",
        "Names of all staff members of the {dept} department.",
        "Which employees belong to the {dept} department?",
        "Show me everyone working for {dept}.",
        "Give the employee names for department {dept}.",
    ), {"dept": "dept"}, _fixed(f"SELECT e.name {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_count", (
        "How many employees work in the {dept} department?",
        "Count the staff of {dept}.",
        "What is the number of employees in {dept}?",
        "How many people does the {dept} department have?",
        "Tell me the headcount of {dept}.",
        "Number of employees working for {dept}?",
    ), {"dept": "dept"}, _fixed(f"SELECT COUNT(*) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_avg_salary", (
        "What is the average salary in the {dept} department?",
        "Average pay of employees in {dept}.",
        "Compute the mean salary of the {dept} staff.",
        "On average, how much do {dept} employees earn?",
        "Give the average employee salary for department {dept}.",
        "Mean salary for people in {dept}?",
    ), {"dept": "dept"}, _fixed(f"SELECT AVG(e.salary) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_max_salary", (
        "What is the highest salary in the {dept} department?",
        "Maximum pay among {dept} employees.",
        "Find the top salary in {dept}.",
        "How much does the best paid person in {dept} earn?",
        "Give the largest salary of department {dept}.",
        "Highest employee salary within {dept}?",
    ), {"dept": "dept"}, _fixed(f"SELECT MAX(e.salary) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("salary_above", (
        "List the names of employees earning more than {amount}.",
        "Who has a salary above {amount}?",
        "Names of staff paid over {amount}.",
        "Which employees make more than {amount} a year?",
        "Show everyone whose salary exceeds {amount}.",
        "Employees with salary greater than {amount}: names please.",
    ), {"amount": "amount"}, _fixed("SELECT name FROM employees WHERE salary > {amount};")),
    Intent("salary_between", (
        "List employees with a salary between {low} and {high}.",
        "Who earns from {low} to {high}? Names only.",
        "Names of staff whose pay is between {low} and {high} inclusive.",
        "Which employees have salaries in the range {low} to {high}?",
        "Show the people paid at least {low} and at most {high}.",
        "Employees earning between {low} and {high}: give names.",
    ), {"low": "amount", "high": "amount"},
        _fixed("SELECT name FROM employees WHERE salary BETWEEN {low} AND {high};")),
    Intent("hired_in", (
        "Which employees were hired in {year}?",
        "List the names of people who joined in {year}.",
        "Names of staff with hire year {year}.",
        "Who started working here in {year}?",
        "Show the employees hired during {year}.",
        "Give me everyone whose hire year is {year}.",
    ), {"year": "year"}, _fixed("SELECT name FROM employees WHERE hire_year = {year};")),
    Intent("hired_after_count", (
        "How many employees were hired after {year}?",
        "Count the people who joined later than {year}.",
        "Number of staff with a hire year greater than {year}.",
        "How many hires happened after the year {year}?",
        "Tell me how many employees started after {year}.",
        "What is the count of employees hired after {year}?",
    ), {"year": "year"}, _fixed("SELECT COUNT(*) FROM employees WHERE hire_year > {year};")),
    Intent("title_names", (
        "List the names of all employees with the title {title}.",
        "Who works as a {title}?",
        "Names of staff whose job title is {title}.",
        "Which employees hold the title {title}?",
        "Show everyone employed as {title}.",
        "Give the names of people with title {title}.",
    ), {"title": "title"}, _fixed("SELECT name FROM employees WHERE title = '{title}';")),
    Intent("city_departments", (
        "Which departments are located in {city}?",
        "List the names of departments in {city}.",
        "Names of the departments based in {city}.",
        "What departments does the {city} office host?",
        "Show all departments whose city is {city}.",
        "Give the departments situated in {city}.",
    ), {"city": "city"}, _fixed("SELECT name FROM departments WHERE city = '{city}';")),
    Intent("city_employees", (
        "List the names of employees who work in {city}.",
        "Who is based in {city}? Employee names only.",
        "Names of staff whose department is in {city}.",
        "Which employees work at the {city} location?",
        "Show everyone working in a department in {city}.",
        "Give the employees located in {city}.",
    ), {"city": "city"}, _fixed(f"SELECT e.name {JOIN} WHERE d.city = '{{city}}';")),
    Intent("top_paid", (
        "List the {k} highest paid employees, highest first.",
        "Who are the top {k} earners? Order by salary descending.",
        "Names of the {k} employees with the largest salaries, best paid first.",
        "Give the {k} best paid people in descending order of salary.",
        "Show the top {k} salaries' owners from highest to lowest.",
        "Which {k} employees earn the most? Sort from the highest salary.",
    ), {"k": "k"},
        _fixed("SELECT name FROM employees ORDER BY salary DESC LIMIT {k};", ordered=True)),
    Intent("employee_salary", (
        "What is the salary of {employee}?",
        "How much does {employee} earn?",
        "Give the pay of the employee named {employee}.",
        "Tell me {employee}'s salary.",
        "Show the salary for {employee}.",
        "Salary of employee {employee}?",
    ), {"employee": "employee"},
        _fixed("SELECT salary FROM employees WHERE name = '{employee}';")),
    Intent("employee_department", (
        "Which department does {employee} work in?",
        "What is the department of {employee}?",
        "Name the department that {employee} belongs to.",
        "In which department is {employee} employed?",
        "Tell me {employee}'s department.",
        "Department name for employee {employee}?",
    ), {"employee": "employee"},
        _fixed(f"SELECT d.name {JOIN} WHERE e.name = '{{employee}}';")),
    Intent("budget_above", (
        "Which departments have a budget above {budget}?",
        "List departments whose budget exceeds {budget}.",
        "Names of departments with budgets greater than {budget}.",
        "What departments are funded with more than {budget}?",
        "Show the departments having a budget over {budget}.",
        "Give departments with budget larger than {budget}.",
    ), {"budget": "budget"}, _fixed("SELECT name FROM departments WHERE budget > {budget};")),
    Intent("dept_by_salary", (
        "List the employees of {dept} ordered by salary, lowest first.",
        "Names of {dept} staff sorted by salary ascending.",
        "Show {dept} employees from the lowest to the highest salary.",
        "Give the people in {dept}, in increasing order of pay.",
        "Who works in {dept}? Sort by salary from low to high.",
        "Employees of department {dept} by ascending salary.",
    ), {"dept": "dept"},
        _fixed(f"SELECT e.name {JOIN} WHERE d.name = '{{dept}}' ORDER BY e.salary;",
               ordered=True)),
)

POOLS = {
    "dept": DEPARTMENTS,
    "city": CITIES,
    "title": TITLES,
    "employee": tuple(row[1] for row in EMPLOYEE_ROWS),
    "year": YEARS[:-1],  # "after 2024" would be empty
    "amount": tuple(range(40_000, 142_000, 2_000)),
    "budget": tuple(range(200_000, 1_900_000, 100_000)),
    "k": tuple(range(2, 17)),
}


class SqlTask(TemplateTask):
    """Text-to-SQL; see the module docstring for how answers are scored."""

    name = "sql"
    system = SYSTEM
    intents = INTENTS
    pools = POOLS

    def extract(self, text: str) -> str:
        return extract_sql(text)

    def score(self, prediction: str, example: Example) -> float:
        conn = connect()
        try:
            want = run_query(conn, example.reference)
            try:
                got = run_query(conn, self.extract(prediction))
            except (sqlite3.Error, SqlRefused, ValueError, OverflowError):
                # ValueError: e.g. a NUL character in the text; OverflowError: huge ints.
                return 0.0
            return float(same_result(got, want, bool(example.grading.get("ordered"))))
        finally:
            conn.close()
