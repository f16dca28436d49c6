"""The default storage of a study, the SQLite file runs/NAME/study.db, under real worker processes: the same checks
as test_tune_storage.py's on PostgreSQL (K workers finish exactly N trials; a SIGKILLed worker's trial is
failed and retried with its parameters), with no server to start, so they run on every machine."""

from studies import k_workers_finish_exactly_n, killed_mid_trial_is_retried


def test_worker_processes_share_the_sqlite_study_and_finish_exactly_n(tmp_path):
    k_workers_finish_exactly_n(tmp_path, None)
    assert (tmp_path / "shared" / "study.db").is_file()  # the default storage, not another


def test_a_worker_killed_mid_trial_on_sqlite_is_failed_retried_and_the_study_completes(tmp_path):
    killed_mid_trial_is_retried(tmp_path, None)
