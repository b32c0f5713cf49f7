"""revlens.experiments: a setting is the base model plus what its definition says; instrumented runs are cacheable.

Training a setting through the run cache is tested in test_run_cache.py, its result tables in test_tables.py.
"""

from revlens.experiments import BASE_MODEL, SETTINGS, standard_loggers


def test_arm_and_mdm_differ_only_in_objective_and_attention_direction(small_world):
    mdm, arm = (SETTINGS[name].model_cfg(small_world).to_dict() for name in ("MDM", "ARM"))
    assert {key for key in mdm if mdm[key] != arm[key]} == {"attention_dir"}
    assert (SETTINGS["MDM"].objective, SETTINGS["ARM"].objective) == ("mdm", "arm")
    assert {key: mdm[key] for key in BASE_MODEL} == BASE_MODEL
    assert (mdm["d_vocab"], mdm["n_ctx"]) == (small_world.d_vocab, 3)


def test_the_standard_loggers_carry_cache_ids(small_world):
    """So an instrumented run (the default of train_setting) is cached."""
    assert all(getattr(logger, "cache_id", None) for logger in standard_loggers(small_world, "mdm"))
