"""Four fixes to pymongosql 0.7.4 as Superset uses it: chart an empty collection (no rows instead of "no such table:
virtual_table"), run a virtual dataset's ``collection.aggregate('<pipeline>', '<options>')`` in MongoDB, keep each
query's result columns apart when charts run at once, and share one MongoClient per server instead of connecting
for every chart.

pymongosql 0.7.4 in ``mode=superset`` runs the inner SELECT of a virtual dataset on MongoDB, loads the rows into an
in-memory SQLite table and runs Superset's outer query there. Without rows it creates no table, so every chart of
an empty collection fails (the data-quality dashboard before the first dead letter, the training dashboard before
the first round). And its two-stage path runs every inner SELECT as a find, so an inner
``SELECT ... FROM coll.aggregate('[...]', '{}')`` (which pymongosql runs as a pipeline on its own) silently read the
whole collection instead. `install()` swaps in an execution strategy that creates the table with the inner
SELECT's columns even when there are no rows, and runs an inner aggregate() as the pipeline it names.

pymongosql keeps the plan of the query it ran last (its result columns) on the execution strategy, one object that
gunicorn's threads share; the cursor reads it back after `execute`. With several charts of a dashboard queried at
once, a chart could get another's columns ("Db engine did not return all queried columns", seen on the
data-quality page in CI). The strategy here keeps that plan per thread.

Superset opens a new DB-API connection for every query (NullPool), and each pymongosql connection built a new
MongoClient (connection pool, handshake, server selection): a dashboard paid that for each chart. `install()` also
makes pymongosql take its clients from a process-wide cache (MongoClient is thread-safe and pools connections);
closing a connection leaves the shared client open.

This file runs inside Superset's virtualenv: the generated ``superset_config.py`` loads it by path and calls
`install()`. It imports only pymongosql.
"""
from __future__ import annotations

import re
import threading

import pymongo

from pymongosql.executor import ExecutionPlanFactory
from pymongosql.superset_mongodb.detector import SubqueryDetector
from pymongosql.superset_mongodb.executor import SupersetExecution
from pymongosql.superset_mongodb.query_db_sqlite import QueryDBSQLite

# The column names of the inner SELECT being executed, and the plan of the query last run, per thread (gunicorn
# serves charts from several threads and pymongosql shares one strategy object between them).
_inner_select = threading.local()
_last_plan = threading.local()


def select_list_names(select: str) -> list[str]:
    """Column names of a plain ``SELECT a, b AS c, "d" FROM ...``; empty for ``SELECT *``.

    >>> select_list_names('SELECT reason, "at", device_id AS device FROM dead_letters')
    ['reason', 'at', 'device']
    """
    listed = re.match(r"\s*SELECT\s+(.*?)\s+FROM\s", select, re.IGNORECASE | re.DOTALL)
    if not listed:
        return []
    names = [re.split(r"\s+AS\s+", item.strip(), flags=re.IGNORECASE)[-1].strip().strip('"`')
             for item in listed.group(1).split(",")]
    return [] if "*" in names else names


class QueryDBWithEmptyTables(QueryDBSQLite):
    """The SQLite stage, creating the table of an inner SELECT without rows instead of skipping it."""

    def insert_records(self, table_name, records, schema=None):
        names = getattr(_inner_select, "names", [])
        if not records and names and table_name not in self._tables:
            self.create_table(table_name, {name: "TEXT" for name in names})
            return 0
        return super().insert_records(table_name, records, schema)


class SupersetExecutionWithEmptyResults(SupersetExecution):
    """pymongosql's two-stage Superset execution, answering an empty collection with no rows."""

    def __init__(self) -> None:
        super().__init__(query_db_factory=QueryDBWithEmptyTables)

    @property
    def _execution_plan(self):  # pymongosql's attribute, read back by the cursor: per thread, not per object
        return getattr(_last_plan, "plan", None)

    @_execution_plan.setter
    def _execution_plan(self, plan) -> None:
        _last_plan.plan = plan

    def execute(self, context, connection, parameters=None):
        query = SubqueryDetector.detect(context.query)
        _inner_select.names = select_list_names(query.subquery_text) if query.has_subquery else []
        return super().execute(context, connection, parameters)

    def _execute_find_plan(self, execution_plan, connection=None, parameters=None):
        if getattr(execution_plan, "is_aggregate_query", False):
            return self._execute_aggregate_plan(execution_plan, connection, parameters)
        return super()._execute_find_plan(execution_plan, connection, parameters)


_clients: dict[str, pymongo.MongoClient] = {}
_clients_lock = threading.Lock()


def shared_client(**params) -> pymongo.MongoClient:
    """The process's MongoClient for these parameters (made on first use); its close() does nothing."""
    key = repr(sorted((k, repr(v)) for k, v in params.items()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = pymongo.MongoClient(**params)
            client.close = lambda: None  # pymongosql closes it with each connection: keep it for the next one
        return client


def install() -> None:
    """Replace pymongosql's registered Superset strategy by `SupersetExecutionWithEmptyResults`, and its
    MongoClient by `shared_client`."""
    import pymongosql.connection

    pymongosql.connection.MongoClient = shared_client
    strategies = ExecutionPlanFactory._strategies
    strategies[:] = [SupersetExecutionWithEmptyResults() if type(strategy) is SupersetExecution else strategy
                     for strategy in strategies]
