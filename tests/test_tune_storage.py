"""Studies shared through a real PostgreSQL server on loopback (started here with initdb/pg_ctl in a
temporary folder; `.ci/run` installs PostgreSQL from Debian's packages where it is missing): worker
processes share one study, and a worker killed mid-trial neither stalls the study nor leaves its trial
RUNNING. The checks are functions of the storage, so test_sqlite_study.py runs the same on the default
SQLite file."""

from conftest import needs
from studies import k_workers_finish_exactly_n, killed_mid_trial_is_retried


@needs("psycopg2")  # the PostgreSQL driver comes with `pip install -e '.[dev]'`
def test_worker_processes_share_one_study_and_finish_exactly_n(postgres, tmp_path):
    k_workers_finish_exactly_n(tmp_path, postgres)


@needs("psycopg2")
def test_a_worker_killed_mid_trial_is_failed_retried_and_the_study_completes(postgres, tmp_path):
    killed_mid_trial_is_retried(tmp_path, postgres)
