"""Scorers on known right and wrong answers, sandbox containment, split hygiene."""

from __future__ import annotations

import builtins
import json
import sqlite3
import time

import pytest

from loramux.skills import sql
from loramux.skills.fields import JsonTask
from loramux.skills.pycode import PythonTask
from loramux.skills.sandbox import SandboxLimits
from loramux.skills.sql import SqlRefused, SqlTask
from loramux.skills.tasks import SPLITS, TASK_NAMES, Example, make_task, strip_fences

FAST = SandboxLimits(wall_seconds=1.5, cpu_seconds=1)


@pytest.fixture(scope="module")
def splits():
    """task name → split → examples (default seed), generated once."""
    return {name: {s: make_task(name).examples(s) for s in SPLITS} for name in TASK_NAMES}


def _example(task: str, reference: str, **grading) -> Example:
    return Example(task, ({"role": "user", "content": "q"},), reference, f"{task}/x/0", (),
                   grading)


# ---------------------------------------------------------------- SQL


def _salary_nobody_has() -> int:
    salaries = {row[3] for row in sql.EMPLOYEE_ROWS}
    return next(s for s in range(60_000, 100_000, 1000) if s not in salaries)


def test_sql_references_score_one(splits):
    task = SqlTask()
    for ex in splits["sql"]["test"] + splits["sql"]["validation"]:
        assert task.score(ex.reference, ex) == 1.0, ex.reference


def test_sql_references_are_never_empty(splits):
    conn = sql.connect()
    for split in SPLITS:
        for ex in splits["sql"][split]:
            assert sql.run_query(conn, ex.reference), ex.reference


def test_sql_equivalent_query_and_chatter_are_right():
    task = SqlTask()
    ex = _example("sql", "SELECT e.name FROM employees e JOIN departments d "
                         "ON e.department_id = d.id WHERE d.name = 'Legal';")
    other = ("Sure! Here it is:\n```sql\nselect name from employees where department_id = "
             "(select id from departments where name = 'Legal')\n```\nThis lists them.")
    assert task.score(other, ex) == 1.0
    assert task.score("SELECT name FROM employees WHERE department_id = 1;", ex) == 0.0
    assert task.score("I don't know.", ex) == 0.0


def test_sql_wrong_query_with_same_rows_counts_as_right():
    """Execution accuracy: `>=` for "more than" is right when nobody earns exactly the
    threshold (same result set), wrong when somebody does."""
    task = SqlTask()
    x = _salary_nobody_has()
    ex = _example("sql", f"SELECT name FROM employees WHERE salary > {x};")
    assert task.score(f"SELECT name FROM employees WHERE salary >= {x};", ex) == 1.0
    exact = sql.EMPLOYEE_ROWS[0][3]
    ex = _example("sql", f"SELECT name FROM employees WHERE salary > {exact};")
    assert task.score(f"SELECT name FROM employees WHERE salary >= {exact};", ex) == 0.0


def test_sql_order_matters_only_when_asked():
    task = SqlTask()
    top = "SELECT name FROM employees ORDER BY salary DESC LIMIT 5;"
    reversed_top = ("SELECT name FROM (SELECT name, salary FROM employees ORDER BY salary "
                    "DESC LIMIT 5) ORDER BY salary;")
    assert task.score(reversed_top, _example("sql", top, ordered=True)) == 0.0
    assert task.score(reversed_top, _example("sql", top, ordered=False)) == 1.0
    # Column count matters, column names do not.
    assert task.score("SELECT name AS n FROM employees ORDER BY salary DESC LIMIT 5;",
                      _example("sql", top, ordered=True)) == 1.0
    assert task.score("SELECT name, salary FROM employees ORDER BY salary DESC LIMIT 5;",
                      _example("sql", top, ordered=True)) == 0.0


@pytest.mark.parametrize("query", [
    "DELETE FROM employees;",
    "UPDATE employees SET salary = 0;",
    "INSERT INTO departments VALUES (99, 'X', 'Y', 1);",
    "DROP TABLE employees;",
    "CREATE TABLE t (x);",
    "CREATE TEMP TABLE t AS SELECT * FROM employees;",
    "ATTACH DATABASE 'pwned.db' AS p;",
    "PRAGMA query_only = OFF;",
    "PRAGMA table_info(employees);",
    "BEGIN;",
    "SELECT load_extension('x');",
])
def test_sql_anything_but_reading_is_refused(query, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    conn = sql.connect()
    with pytest.raises(sqlite3.Error):
        sql.run_query(conn, query)
    assert len(sql.run_query(conn, "SELECT * FROM employees;")) == sql.NUM_EMPLOYEES
    assert not list(tmp_path.iterdir())
    ex = _example("sql", "SELECT COUNT(*) FROM employees;")
    assert SqlTask().score(query, ex) == 0.0


def test_sql_second_statement_never_runs():
    conn = sql.connect()
    assert sql.extract_sql("SELECT 1; DELETE FROM employees;") == "SELECT 1;"
    with pytest.raises(sqlite3.Error):  # sqlite3 itself refuses two statements
        sql.run_query(conn, "SELECT 1; SELECT 2;")


def test_sql_runaway_query_is_interrupted():
    conn = sql.connect()
    forever = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
               "SELECT COUNT(*) FROM c;")
    start = time.monotonic()
    with pytest.raises(SqlRefused, match="ran past"):
        sql.run_query(conn, forever, timeout_s=0.3)
    assert time.monotonic() - start < 2.0
    with pytest.raises(SqlRefused, match="more than"):
        sql.run_query(conn, "SELECT * FROM employees a, employees b;")
    with pytest.raises(sqlite3.Error):
        sql.run_query(conn, "SELECT randomblob(100000000);")


# ---------------------------------------------------------------- Python


def test_python_references_score_one(splits):
    task = PythonTask(limits=FAST)
    by_intent = {}
    for ex in splits["python"]["test"]:
        by_intent.setdefault(ex.template_id.split("/")[1], ex)
    assert len(by_intent) == 14
    for ex in by_intent.values():
        assert task.score(ex.reference, ex) == 1.0, ex.reference


def _python_example(body: str = "n % 3 == 0") -> Example:
    ex = _example("python", f"def check(n):\n    return {body}\n", function="check",
                  inputs=[[0], [3], [4], [-6], [7]])
    expected = [json.dumps(n % 3 == 0) for (n,) in ex.grading["inputs"]]
    return _example("python", ex.reference, **{**ex.grading, "expected": expected})


def test_python_right_and_wrong_answers():
    task = PythonTask(limits=FAST)
    ex = _python_example()
    assert task.score("```python\ndef check(n):\n    if n % 3:\n        return False\n"
                      "    return True\n```\nThis checks divisibility.", ex) == 1.0
    assert task.score("Here is the code:\ndef check(n):\n    return not n % 3", ex) == 1.0
    assert task.score("def check(n):\n    return n % 3 == 1", ex) == 0.0
    assert task.score("def check(n):\n    return int(n % 3 == 0)", ex) == 0.0  # 1 is not True
    assert task.score("def other(n):\n    return n % 3 == 0", ex) == 0.0
    assert task.score("def check(n) return", ex) == 0.0
    assert task.score("", ex) == 0.0


def test_python_infinite_loop_scores_zero_within_limit():
    task = PythonTask(limits=FAST)
    start = time.monotonic()
    assert task.score("def check(n):\n    while True:\n        pass", _python_example()) == 0.0
    assert time.monotonic() - start < FAST.wall_seconds + 2.0


@pytest.mark.parametrize("attack", [
    "import socket\n    socket.create_connection(('127.0.0.1', 9))",
    "import socket\n    socket.socket().bind(('127.0.0.1', 0))",
    "import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:9')",
    "open({path!r}, 'w').write('x')",
    "import os\n    os.close(os.open({path!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\n    pathlib.Path({path!r}).touch()",
    "import subprocess\n    subprocess.run(['touch', {path!r}])",
    "import os\n    os.system('touch ' + {path!r})",
    "import os\n    os._exit(0)",
])
def test_python_network_and_writes_score_zero(attack, tmp_path):
    path = str(tmp_path / "pwned")
    code = "def check(n):\n    " + attack.format(path=path) + "\n    return n % 3 == 0\n"
    assert PythonTask(limits=FAST).score(code, _python_example()) == 0.0
    assert not (tmp_path / "pwned").exists()


def test_python_code_never_runs_in_this_process():
    code = ("import builtins\nbuiltins.LORAMUX_PWNED = True\n"
            "def check(n):\n    return n % 3 == 0\n")
    assert PythonTask(limits=FAST).score(code, _python_example()) == 1.0
    assert not hasattr(builtins, "LORAMUX_PWNED")


# ---------------------------------------------------------------- JSON


def test_json_exact_match_of_parsed_object():
    task = JsonTask()
    want = {"name": "Ada", "age": 36, "city": "Lima"}
    ex = _example("json", json.dumps(want), expected=want)
    assert task.score('{"name": "Ada", "age": 36, "city": "Lima"}', ex) == 1.0
    assert task.score('{"city": "Lima", "name": "Ada", "age": 36}', ex) == 1.0  # key order
    assert task.score('Sure:\n```json\n{"name":"Ada","age":36,"city":"Lima"}\n```', ex) == 1.0
    assert task.score('{"name": "Ada", "age": 36, "city": "Lima", "x": 1}', ex) == 0.0
    assert task.score('{"name": "Ada", "age": 36}', ex) == 0.0
    assert task.score('{"name": "Ada", "age": "36", "city": "Lima"}', ex) == 0.0
    assert task.score('{"name": "ada", "age": 36, "city": "Lima"}', ex) == 0.0
    assert task.score('{"name": "Ada", "age": 36, "city": "Lima"', ex) == 0.0
    assert task.score('["Ada", 36, "Lima"]', ex) == 0.0


def test_json_references_score_one(splits):
    task = JsonTask()
    assert all(task.score(ex.reference, ex) == 1.0 for ex in splits["json"]["test"])


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("name", TASK_NAMES)
def test_splits_disjoint_by_template_value_and_prompt(name, splits):
    by_split = splits[name]
    templates = {s: {ex.template_id for ex in exs} for s, exs in by_split.items()}
    values = {s: {v for ex in exs for _, v in ex.values} for s, exs in by_split.items()}
    prompts = {s: {ex.prompt for ex in exs} for s, exs in by_split.items()}
    for a, b in (("train", "test"), ("train", "validation"), ("validation", "test")):
        assert not templates[a] & templates[b]
        assert not values[a] & values[b], values[a] & values[b]
        assert not prompts[a] & prompts[b]
    intents = {t.split("/")[1] for t in templates["train"]}
    for split in SPLITS:  # every intent is trained and tested
        assert {t.split("/")[1] for t in templates[split]} == intents
        assert len(by_split[split]) == len(prompts[split])  # no duplicates


@pytest.mark.parametrize("name", TASK_NAMES)
def test_generation_is_deterministic_by_seed(name):
    a = make_task(name, seed=7, sizes={"train": 50, "validation": 20, "test": 20})
    b = make_task(name, seed=7, sizes={"train": 50, "validation": 20, "test": 20})
    c = make_task(name, seed=8, sizes={"train": 50, "validation": 20, "test": 20})
    for split in SPLITS:
        ea, eb = a.examples(split), b.examples(split)
        assert ea == eb and [e.grading for e in ea] == [e.grading for e in eb]
    assert a.examples("train") != c.examples("train")


def test_strip_fences():
    assert strip_fences("```sql\nSELECT 1;\n```\nbye") == "SELECT 1;"
    assert strip_fences("see ```SELECT 1``` here") == "SELECT 1"
    assert strip_fences("```python\ndef f(): pass") == "def f(): pass"  # unclosed
    assert strip_fences("  plain  ") == "plain"


def test_sandbox_blocks_connection_to_a_live_listener():
    """Not just 'nothing listens there': a real server sees no connection."""
    import socket

    from loramux.skills.sandbox import run_function

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = ("import socket\ndef f():\n"
                f"    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                "    return 1\n")
        result = run_function(code, "f", [[]], FAST)
        assert result.status == "ok"
        assert "sandbox: socket" in result.outputs[0]["error"]
        with pytest.raises(TimeoutError):
            server.accept()
