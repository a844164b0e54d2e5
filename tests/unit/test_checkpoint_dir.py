"""Checkpoint completeness, the 'latest' pointer, fallback and pruning (no DeepSpeed needed)."""

from pyramidion_ds.checkpoint import CheckpointDir, tag_for


def fake_save(ckpt: CheckpointDir, update: int, finalize=True):
    tag = tag_for(update)
    path = ckpt.root / tag
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    (path / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 50)
    if finalize:
        ckpt.finalize(tag, update=update, world_size=2)
    return tag


def test_latest_moves_only_when_finalized(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    first = fake_save(ckpt, 10)
    fake_save(ckpt, 20, finalize=False)  # a save that died mid-way
    assert ckpt.read_pointer("latest") == first
    warnings = []
    assert ckpt.latest_complete(warn=warnings.append).tag == first
    assert warnings == []  # latest never named the unfinished save


def test_truncated_shard_falls_back_to_previous(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    older = fake_save(ckpt, 10)
    newer = fake_save(ckpt, 20)
    shard = ckpt.root / newer / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"y" * 10)
    warnings = []
    info = ckpt.latest_complete(warn=warnings.append)
    assert info.tag == older and info.world_size == 2
    assert any("truncated" in w for w in warnings) and any("falling back" in w for w in warnings)


def test_prune_keeps_last_n_and_best(tmp_path):
    ckpt = CheckpointDir(tmp_path)
    tags = [fake_save(ckpt, u) for u in (10, 20, 30, 40, 50)]
    ckpt.mark_best(tags[1])
    removed = ckpt.prune(2)
    assert sorted(removed) == [tags[0], tags[2]]
    assert ckpt.tags() == [tags[4], tags[3], tags[1]]


def test_empty_dir(tmp_path):
    assert CheckpointDir(tmp_path).latest_complete(warn=lambda m: None) is None


def test_symlinks_out_of_the_run_dir_make_a_checkpoint_incomplete(tmp_path):
    """A shard or a whole tag dir linked out of the run dir is skipped like a manifest entry naming ../
    (issue #25); a link that stays inside the run dir is followed."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    ckpt = CheckpointDir(run)
    fake_save(ckpt, 10)
    inside = fake_save(ckpt, 20)
    (run / "kept").mkdir()
    shard = ckpt.root / inside / "mp_rank_00_model_states.pt"
    shard.rename(run / "kept" / shard.name)
    shard.symlink_to(run / "kept" / shard.name)
    assert ckpt.problem(inside) is None
    linked_shard, linked_tag = fake_save(ckpt, 30), fake_save(ckpt, 40)
    elsewhere.mkdir()
    shard = ckpt.root / linked_shard / "mp_rank_00_model_states.pt"
    shard.rename(elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)
    (ckpt.root / linked_tag).rename(elsewhere / linked_tag)
    (ckpt.root / linked_tag).symlink_to(elsewhere / linked_tag)
    warnings = []
    assert ckpt.latest_complete(warn=warnings.append).tag == inside
    assert f"{shard} is a symbolic link to {elsewhere / shard.name}, outside the run dir {run}" in warnings[1]
    assert f"{ckpt.root / linked_tag} is a symbolic link to {elsewhere / linked_tag}, outside" in warnings[0]
