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


# Per intent: 12 wordings (index 3 validation, 4 test, every other index train).
INTENTS = (
    Intent("dept_names", (
        "List the names of the employees in the {dept} department.",
        "Who works in {dept}? Give their names.",
        "Names of all staff members of the {dept} department.",
        "Which employees belong to the {dept} department?",
        "Show me everyone working for {dept}.",
        "Give the employee names for department {dept}.",
        "For the {dept} department, list every employee's name.",
        "What are the names of the people employed in {dept}?",
        "{dept} department: employee names only.",
        "Could you fetch the names of all employees assigned to {dept}?",
        "I'd like a list of the names of every {dept} staff member.",
        "Find all members of the {dept} department and return their names.",
    ), {"dept": "dept"}, _fixed(f"SELECT e.name {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_count", (
        "How many employees work in the {dept} department?",
        "Count the staff of {dept}.",
        "What is the number of employees in {dept}?",
        "How many people does the {dept} department have?",
        "Tell me the headcount of {dept}.",
        "Number of employees working for {dept}?",
        "Please count the employees of the {dept} department.",
        "What's the total number of people employed in {dept}?",
        "Employee count for the {dept} department?",
        "Can you find out how many employees are assigned to {dept}?",
        "We want the number of workers in {dept}.",
        "Get the total number of staff members in the {dept} department.",
    ), {"dept": "dept"}, _fixed(f"SELECT COUNT(*) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_avg_salary", (
        "What is the average salary in the {dept} department?",
        "Average pay of employees in {dept}.",
        "Compute the mean salary of the {dept} staff.",
        "On average, how much do {dept} employees earn?",
        "Give the average employee salary for department {dept}.",
        "Mean salary for people in {dept}?",
        "Please compute the average salary of everyone in {dept}.",
        "Mean of the salaries earned in {dept}, please.",
        "{dept} department: average salary.",
        "Could you work out the mean salary of the {dept} employees?",
        "I'd like to know the average pay of the people working in {dept}.",
        "Across all {dept} staff, what is the mean salary?",
    ), {"dept": "dept"}, _fixed(f"SELECT AVG(e.salary) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("dept_max_salary", (
        "What is the highest salary in the {dept} department?",
        "Maximum pay among {dept} employees.",
        "Find the top salary in {dept}.",
        "How much does the best paid person in {dept} earn?",
        "Give the largest salary of department {dept}.",
        "Highest employee salary within {dept}?",
        "Please find the maximum salary paid in the {dept} department.",
        "What's the highest pay anyone in {dept} receives?",
        "Top salary in the {dept} department?",
        "Can you look up the biggest salary among the {dept} staff?",
        "I want to know the greatest salary earned by anyone in {dept}.",
        "Among {dept} employees, what is the top salary?",
    ), {"dept": "dept"}, _fixed(f"SELECT MAX(e.salary) {JOIN} WHERE d.name = '{{dept}}';")),
    Intent("salary_above", (
        "List the names of employees earning more than {amount}.",
        "Who has a salary above {amount}?",
        "Names of staff paid over {amount}.",
        "Which employees make more than {amount} a year?",
        "Show everyone whose salary exceeds {amount}.",
        "Employees with salary greater than {amount}: names please.",
        "Get the names of everyone earning strictly more than {amount}.",
        "Who is paid more than {amount}? Just the names.",
        "Employee names where the salary is over {amount}.",
        "Could you find the employees earning above {amount} and list their names?",
        "I'd like the names of all staff members whose pay is higher than {amount}.",
        "Retrieve employees with salary > {amount}; return their names.",
    ), {"amount": "amount"}, _fixed("SELECT name FROM employees WHERE salary > {amount};")),
    Intent("salary_between", (
        "List employees with a salary between {low} and {high}.",
        "Who earns from {low} to {high}? Names only.",
        "Names of staff whose pay is between {low} and {high} inclusive.",
        "Which employees have salaries in the range {low} to {high}?",
        "Show the people paid at least {low} and at most {high}.",
        "Employees earning between {low} and {high}: give names.",
        "Please give the names of employees whose salary lies between {low} and "
        "{high}, bounds included.",
        "Who is paid anywhere from {low} up to {high}, inclusive? Names only.",
        "Names of employees with {low} <= salary <= {high}.",
        "Could you find everyone whose pay is between {low} and {high}, both "
        "included, and list their names?",
        "I'd like the names of staff whose salary is in the closed interval [{low}, {high}].",
        "Get the names of everyone with a salary from {low} through {high}.",
    ), {"low": "amount", "high": "amount"},
        _fixed("SELECT name FROM employees WHERE salary BETWEEN {low} AND {high};")),
    Intent("hired_in", (
        "Which employees were hired in {year}?",
        "List the names of people who joined in {year}.",
        "Names of staff with hire year {year}.",
        "Who started working here in {year}?",
        "Show the employees hired during {year}.",
        "Give me everyone whose hire year is {year}.",
        "Please list the names of everyone hired in {year}.",
        "What are the names of the employees whose hire year is {year}?",
        "{year} hires, names only.",
        "Could you find the people who were taken on in {year} and give their names?",
        "I'd like the names of the employees that joined the company in {year}.",
        "Retrieve all employees with hire_year = {year}; return their names.",
    ), {"year": "year"}, _fixed("SELECT name FROM employees WHERE hire_year = {year};")),
    Intent("hired_after_count", (
        "How many employees were hired after {year}?",
        "Count the people who joined later than {year}.",
        "Number of staff with a hire year greater than {year}.",
        "How many hires happened after the year {year}?",
        "Tell me how many employees started after {year}.",
        "What is the count of employees hired after {year}?",
        "Please count the employees hired after {year}.",
        "What's the number of people who joined after {year}?",
        "Employees hired later than {year}: how many are there?",
        "Could you count the staff whose hire year comes after {year}?",
        "My manager wants the number of employees with a hire year above {year}.",
        "Find how many employees were hired in some year after {year}.",
    ), {"year": "year"}, _fixed("SELECT COUNT(*) FROM employees WHERE hire_year > {year};")),
    Intent("title_names", (
        "List the names of all employees with the title {title}.",
        "Who works as a {title}?",
        "Names of staff whose job title is {title}.",
        "Which employees hold the title {title}?",
        "Show everyone employed as {title}.",
        "Give the names of people with title {title}.",
        "Please list the names of the employees whose title is {title}.",
        "What are the names of the people working as {title}?",
        "Employees with job title {title}: names only.",
        "Can you find every {title} in the company and give me their names?",
        "I'd like the names of staff members in the {title} role.",
        "Retrieve the employees titled {title}; return their names.",
    ), {"title": "title"}, _fixed("SELECT name FROM employees WHERE title = '{title}';")),
    Intent("city_departments", (
        "Which departments are located in {city}?",
        "List the names of departments in {city}.",
        "Names of the departments based in {city}.",
        "What departments does the {city} office host?",
        "Show all departments whose city is {city}.",
        "Give the departments situated in {city}.",
        "Among all departments, list the names of those located in {city}.",
        "Which departments have {city} as their city?",
        "Departments located in {city}: names only.",
        "Could you find the names of all departments whose location is {city}?",
        "I'd like to know which departments sit in {city}; give their names.",
        "Find the departments in the city {city} and return their names.",
    ), {"city": "city"}, _fixed("SELECT name FROM departments WHERE city = '{city}';")),
    Intent("city_employees", (
        "List the names of employees who work in {city}.",
        "Who is based in {city}? Employee names only.",
        "Names of staff whose department is in {city}.",
        "Which employees work at the {city} location?",
        "Show everyone working in a department in {city}.",
        "Give the employees located in {city}.",
        "Please list the names of the staff whose department is located in {city}.",
        "What are the names of the people working in {city}?",
        "Employees in {city} (by their department's city): names.",
        "Could you find all employees whose department's city is {city}? Names only.",
        "I'd like the names of all workers based in {city}.",
        "Get the employees of the departments located in {city} and return their names.",
    ), {"city": "city"}, _fixed(f"SELECT e.name {JOIN} WHERE d.city = '{{city}}';")),
    Intent("top_paid", (
        "List the {k} highest paid employees, highest first.",
        "Who are the top {k} earners? Order by salary descending.",
        "Names of the {k} employees with the largest salaries, best paid first.",
        "Give the {k} best paid people in descending order of salary.",
        "Show the top {k} salaries' owners from highest to lowest.",
        "Which {k} employees earn the most? Sort from the highest salary.",
        "Please list the names of the {k} employees with the highest "
        "salaries, highest salary first.",
        "Whose salaries are the {k} largest? Names, sorted from the largest salary down.",
        "Top {k} employees by salary (names), sorted descending.",
        "Could you find the {k} best-paid staff members and list their names from the "
        "highest salary downwards?",
        "I'd like the names of the {k} highest earners, ordered by salary from high to low.",
        "Find the {k} employees with the biggest salaries; return their "
        "names, largest salary first.",
    ), {"k": "k"},
        _fixed("SELECT name FROM employees ORDER BY salary DESC LIMIT {k};", ordered=True)),
    Intent("employee_salary", (
        "What is the salary of {employee}?",
        "How much does {employee} earn?",
        "Give the pay of the employee named {employee}.",
        "Tell me {employee}'s salary.",
        "Show the salary for {employee}.",
        "Salary of employee {employee}?",
        "Please look up the salary of {employee}.",
        "What does {employee} get paid?",
        "{employee}: salary?",
        "Could you find out what {employee} earns?",
        "I'd like to know how much {employee} is paid.",
        "Find the salary of the employee called {employee}.",
    ), {"employee": "employee"},
        _fixed("SELECT salary FROM employees WHERE name = '{employee}';")),
    Intent("employee_department", (
        "Which department does {employee} work in?",
        "What is the department of {employee}?",
        "Name the department that {employee} belongs to.",
        "In which department is {employee} employed?",
        "Tell me {employee}'s department.",
        "Department name for employee {employee}?",
        "Please look up the department of {employee}.",
        "Where does {employee} work? Give the department name.",
        "{employee}: which department?",
        "Could you find the name of the department {employee} is in?",
        "I'd like to know what department {employee} is part of.",
        "Find which department the employee named {employee} is assigned to.",
    ), {"employee": "employee"},
        _fixed(f"SELECT d.name {JOIN} WHERE e.name = '{{employee}}';")),
    Intent("budget_above", (
        "Which departments have a budget above {budget}?",
        "List departments whose budget exceeds {budget}.",
        "Names of departments with budgets greater than {budget}.",
        "What departments are funded with more than {budget}?",
        "Show the departments having a budget over {budget}.",
        "Give departments with budget larger than {budget}.",
        "Quick question: what are the names of departments whose budget is above {budget}?",
        "Which departments' budgets are higher than {budget}?",
        "Departments with budget > {budget}: names.",
        "Could you find every department with a budget of more than {budget} and list their names?",
        "I'd like the names of the departments whose budget is bigger than {budget}.",
        "Retrieve the departments with budgets exceeding {budget}; return their names.",
    ), {"budget": "budget"}, _fixed("SELECT name FROM departments WHERE budget > {budget};")),
    Intent("dept_by_salary", (
        "List the employees of {dept} ordered by salary, lowest first.",
        "Names of {dept} staff sorted by salary ascending.",
        "Show {dept} employees from the lowest to the highest salary.",
        "Give the people in {dept}, in increasing order of pay.",
        "Who works in {dept}? Sort by salary from low to high.",
        "Employees of department {dept} by ascending salary.",
        "Please list the names of {dept} employees, ordered by salary ascending.",
        "What are the names of the people in the {dept} department, sorted from the "
        "smallest salary to the largest?",
        "{dept} department: employee names ordered by salary, lowest paid first.",
        "Could you list everyone in {dept} by name, starting with the lowest salary and going up?",
        "I'd like the names of the {dept} employees ranked by pay in ascending order.",
        "Find the employees of {dept} and return their names sorted by increasing salary.",
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
