"""The user study (paper App. E, Fig. 3 and 5a): people judge pairs in a web app backed by a database.

* ``config``: the typed settings of each step (create, serve, results, export).
* ``db``: the schema and every query (SQLite in WAL mode by default, PostgreSQL by URL).
* ``create``: a study's items from an evaluation's ``scores.parquet`` (A vs B) or a pool (winner
  vs loser), raters and their assignments; ``gold``: the gold items, made for the question asked.
* ``app``: the FastAPI web app (rating pages, a JSON API, the admin page).
* ``results``: human win rates with bootstrap intervals, rater agreement, gold-item flags, the
  agreement of AI feedback with people; files, MLflow, and the Pick-a-Pic-style export.

The job is ``jobs/study.py``.
"""
