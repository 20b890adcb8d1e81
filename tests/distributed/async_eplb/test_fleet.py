"""Fleet mode's arithmetic, on cases small enough to check by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vllm.distributed.async_eplb.planner import LayerPlan, plan_layer, plan_layer_moves
from vllm.distributed.async_eplb.simulation import cli
from vllm.distributed.async_eplb.simulation.fleet import (
    COPIES,
    RECV_CROSS,
    RECV_INTRA,
    SENT_CROSS,
    SENT_INTRA,
    FleetSetting,
    Geometry,
    Links,
    PlanCache,
    balancedness,
    geometry_from_config,
    observed_load,
    placement_rank_load,
    rebalance_steps,
    replay,
    stage_seconds,
    static_rank_load,
    sweep_settings,
    traffic_of_moves,
    vllm_available,
)
from vllm.distributed.async_eplb.simulation.fleet_sweep import (
    SweepInputs,
    make_units,
    run_sweep,
)

TINY = Geometry("tiny", 1, 4, 1, 2, expert_bytes=10**9)


def test_static_map_is_vllms_linear_map() -> None:
    # 5 experts on 2 ranks: rank 0 holds 0-2, rank 1 holds 3-4.
    assert static_rank_load(np.array([1.0, 2, 3, 4, 5]), 2).tolist() == [6, 9]
    # 5 experts on 8 ranks: one each on ranks 0-4, none on 5-7.
    assert static_rank_load(np.array([1.0, 2, 3, 4, 5]), 8).tolist() == [
        1,
        2,
        3,
        4,
        5,
        0,
        0,
        0,
    ]


def test_rank_load_splits_an_expert_over_its_replicas() -> None:
    # Expert 0 has two replicas (slots 0 and 2): 4 tokens -> 2 each.
    load = np.array([[4.0, 2, 6]])
    rank_load = placement_rank_load(load, np.array([[0, 1, 0, 2]]), 2)
    assert rank_load.tolist() == [[2 + 2, 2 + 6]]
    assert balancedness(rank_load) == pytest.approx(6 / 8)
    # vLLM's balancedness: layer means summed over layer maxima summed.
    two_layers = np.array([[4.0, 8], [3, 3]])
    assert balancedness(two_layers) == pytest.approx((6 + 3) / (8 + 3))


def test_observed_load_spreads_a_window_over_its_steps() -> None:
    trace = np.array([[[4.0]], [[8.0]]])  # 2 windows of 4 steps each
    cumulative = np.concatenate([np.zeros((1, 1, 1)), trace.cumsum(0)])
    assert observed_load(cumulative, trace, 4, 0).item() == 0
    assert observed_load(cumulative, trace, 4, 3).item() == 3  # 3 steps of 1
    assert observed_load(cumulative, trace, 4, 6).item() == 4 + 2 * 2
    assert observed_load(cumulative, trace, 4, 99).item() == 12


def test_rebalance_steps_first_after_a_quarter_interval() -> None:
    assert rebalance_steps(40, 8) == [2, 10, 18, 26, 34]


def test_traffic_split_by_the_source_node() -> None:
    # 4 ranks x 1 slot, nodes {0, 1} and {2, 3}: ranks 0 and 2 swap, rank 1
    # keeps, rank 3 takes expert 1 from rank 1: all three cross nodes.
    moves = plan_layer_moves([0, 1, 2, 3], [2, 1, 0, 1], num_ranks=4, ranks_per_node=2)
    traffic = traffic_of_moves(moves, ranks_per_node=2)
    assert traffic[RECV_CROSS].tolist() == [1, 0, 1, 1]
    assert traffic[SENT_CROSS].tolist() == [1, 1, 1, 0]
    assert traffic[RECV_INTRA].sum() == traffic[SENT_INTRA].sum() == 0
    # Same node: rank 1 takes expert 0 from rank 0.
    moves = plan_layer_moves([0, 1, 2, 3], [0, 0, 2, 3], num_ranks=4, ranks_per_node=2)
    traffic = traffic_of_moves(moves, ranks_per_node=2)
    assert traffic[RECV_INTRA].tolist() == [0, 1, 0, 0]
    assert traffic[SENT_INTRA].tolist() == [1, 0, 0, 0]
    assert traffic[RECV_CROSS].sum() == 0


def test_traffic_counts_local_copies_and_duplicates() -> None:
    # 2 ranks x 2 slots, a node each. Rank 0's slot 1 copies its own expert 0;
    # rank 1 needs expert 0 in both slots: received once, copied once.
    moves = plan_layer_moves([0, 1, 2, 3], [0, 0, 0, 0], num_ranks=2, ranks_per_node=1)
    traffic = traffic_of_moves(moves, ranks_per_node=1)
    assert traffic[COPIES].tolist() == [1, 1]
    assert traffic[RECV_CROSS].tolist() == [0, 1]
    assert traffic[SENT_CROSS].tolist() == [1, 0]


def test_stage_time_is_the_slowest_rank_layer_after_layer() -> None:
    links = Links(copy_gbps=10.0, intra_node_gbps=2.0, cross_node_gbps=1.0)
    layer_a = np.zeros((5, 2), dtype=np.int64)
    layer_a[COPIES] = [10, 0]  # rank 0: 10 copies / 10 GB/s = 1 s
    layer_a[SENT_INTRA] = [0, 3]  # rank 1: max(3 sent, 1 received) / 2 = 1.5 s
    layer_a[RECV_INTRA] = [0, 1]
    layer_b = np.zeros((5, 2), dtype=np.int64)
    layer_b[RECV_CROSS] = [2, 0]  # rank 0: 2 s
    layer_b[SENT_CROSS] = [0, 2]  # rank 1: 2 s
    layer_b[SENT_INTRA] = [1, 0]  # rank 0: + 0.5 s
    traffic = np.stack([layer_a, layer_b])
    assert stage_seconds(traffic, 10**9, links) == pytest.approx(1.5 + 2.5)
    assert stage_seconds(traffic, 5 * 10**8, links) == pytest.approx(2.0)


def test_plan_cache_plans_each_distinct_change_once() -> None:
    cache = PlanCache(num_ranks=2, ranks_per_node=1)
    old = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    new = np.array([[0, 1, 2, 3], [0, 0, 0, 0]])  # layer 0 unchanged
    first = cache.traffic(old, new)
    assert first.shape == (1, 5, 2) and cache.planned_layers == 1
    again = cache.traffic(old, new)
    assert cache.planned_layers == 1
    assert np.array_equal(first, again)
    assert cache.traffic(old, old).shape == (0, 5, 2)


def _constant_trace(windows: int) -> np.ndarray:
    return np.tile(np.array([8.0, 4, 2, 2]), (windows, 1, 1))


@pytest.mark.parametrize("policy", ["default", "min_migration", "vllm"])
def test_replay_by_hand(policy: str) -> None:
    if policy == "vllm" and not vllm_available():
        pytest.skip("vLLM is not installed")
    # 4 experts of load 8, 4, 2, 2 on 2 GPUs x 2 slots. Without EPLB rank 0
    # holds 8 + 4 = 12; the best packing {8, 2} {4, 2} peaks at 10.
    # 40 steps, rebalances at steps 2, 10, 18, 26, 34.
    setting = FleetSetting(gpus=2, redundant=0, interval=8, window=8, gpus_per_node=1)
    run = replay(
        _constant_trace(4),
        TINY,
        setting,
        policy,
        links=Links(),
        steps_per_window=10,
        step_seconds=1e6,
        cache=PlanCache(2, 1),
    )
    assert run.moe_time_no_eplb == pytest.approx(40 * 12 / 10)
    first = run.rebalances[0]
    assert first.step == 2 and not first.skipped
    # Each rank swaps one expert with the other node: 1 expert in, 1 out.
    assert first.traffic[RECV_CROSS].tolist() == [1, 1]
    assert first.traffic[SENT_CROSS].tolist() == [1, 1]
    assert first.stage_seconds == pytest.approx(1e9 / (Links().cross_node_gbps * 1e9))
    # Sync (vLLM) serves the new placement at once; async one step later
    # (the staging takes less than one 1e6 s step).
    applied = 2 if policy == "vllm" else 3
    assert first.applied_step == applied
    expected = (applied * 12 + (40 - applied) * 10) / 10
    assert run.moe_time == pytest.approx(expected)
    assert run.relative_throughput == pytest.approx(48 / expected)
    # Later rebalances see the same load: nothing left to move.
    assert all(r.layers_moved == 0 for r in run.rebalances[1:])
    if policy != "vllm":  # ours skip a rebalance that gains nothing
        assert all(r.skipped for r in run.rebalances[1:])
    # Window 0 (steps 0-9): mean rank load 8, peak 12 before, 10 after.
    assert run.balancedness[0] == pytest.approx(
        80 / (applied * 12 + (10 - applied) * 10)
    )
    assert run.balancedness[1:].tolist() == pytest.approx([0.8] * 3)


def test_sweep_leaves_out_impossible_settings_with_a_note() -> None:
    geometry = Geometry("dsv3", 58, 256, 8, 8, 44_040_192)
    settings, notes = sweep_settings([64, 144], [0, 32], [1000], [1000], 8, geometry)
    assert [(s.gpus, s.redundant) for s in settings] == [(64, 0), (144, 32)]
    assert len(notes) == 2
    assert "gpus=64 redundant=32: 288 physical slots" in notes[0]
    assert "not divisible by 64 GPUs" in notes[0]
    assert "gpus=144 redundant=0: 256 physical slots" in notes[1]


def test_geometry_from_a_deepseek_v3_config(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "deepseek_v3",
                "num_hidden_layers": 61,
                "first_k_dense_replace": 3,
                "n_routed_experts": 256,
                "n_group": 8,
                "num_experts_per_tok": 8,
                "hidden_size": 7168,
                "moe_intermediate_size": 2048,
            }
        )
    )
    geometry = geometry_from_config(path, bytes_per_element=1)
    assert (geometry.num_layers, geometry.num_experts, geometry.num_groups) == (
        58,
        256,
        8,
    )
    assert geometry.expert_bytes == 44_040_192  # 3 x 7168 x 2048, FP8
    path.write_text(json.dumps({"num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="n_routed_experts"):
        geometry_from_config(path, 1)


def test_cli_fleet_runs_and_writes_its_report(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "num_hidden_layers": 2,
                "num_experts": 8,
                "num_experts_per_tok": 2,
                "hidden_size": 64,
                "moe_intermediate_size": 32,
            }
        )
    )
    out = tmp_path / "out"
    status = cli.main(
        [
            "--fleet",
            "--model-config",
            str(config),
            "--synthetic",
            "30",
            "--gpus",
            "2,4",
            "--gpus-per-node",
            "2",
            "--sweep",
            "redundant=0,2",
            "interval=100",
            "--window",
            "100",
            "--policies",
            "default,min_migration",
            "--steps-per-window",
            "10",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    # (2, 0), (2, 2), (4, 0); (4, 2): 10 slots on 4 GPUs, left out.
    assert len(report["rows"]) == 3 * 2
    assert "skipped gpus=4 redundant=2" in printed
    assert "most throughput for least traffic on 4 GPUs" in printed
    for row in report["rows"]:
        assert (
            row["throughput"] > 0 and row["rebalances_decided"] == 3
        )  # steps 25, 125, 225


def test_cli_fleet_bad_input_is_one_line(capsys) -> None:
    assert cli.main(["--fleet", "--sweep", "colour=1"]) == 2
    assert "--sweep item 'colour=1'" in capsys.readouterr().err
    assert (
        cli.main(["--fleet", "--gpus", "3", "--gpus-per-node", "1", "--redundant", "0"])
        == 2
    )
    assert "not divisible by 3 GPUs" in capsys.readouterr().err
    assert cli.main(["--fleet", "--policies", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def _traffic_from_objects(plan: LayerPlan, ranks_per_node: int) -> np.ndarray:
    """The count from the planner's per-rank objects, one transfer at a time."""
    out = np.zeros((5, plan.num_ranks), dtype=np.int64)
    for rank in plan.ranks:
        for transfer in rank.receives:
            cross = transfer.src_rank // ranks_per_node != rank.rank // ranks_per_node
            out[RECV_CROSS if cross else RECV_INTRA, rank.rank] += 1
            out[SENT_CROSS if cross else SENT_INTRA, transfer.src_rank] += 1
            out[COPIES, rank.rank] += len(transfer.dst_slots) - 1
        out[COPIES, rank.rank] += sum(len(c.dst_slots) for c in rank.local_copies)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_traffic_of_moves_equals_the_count_from_the_plans_objects(seed) -> None:
    rng = np.random.default_rng(seed)
    ranks = int(rng.choice([2, 4, 8, 16, 40]))
    per_node = int(rng.choice([d for d in (1, 2, 4, 8) if ranks % d == 0]))
    slots = ranks * int(rng.integers(1, 5))
    experts = int(rng.integers(max(1, slots // 2), slots + 1))
    old = rng.permutation(np.arange(slots) % experts)
    new = old.copy()
    moved = rng.random(slots) < rng.random()  # from a few slots to nearly all
    new[moved] = rng.permutation(new[moved])
    if rng.random() < 0.5:  # replicas that change count
        new[rng.integers(slots)] = new[rng.integers(slots)]
    plan = plan_layer(torch.from_numpy(old), torch.from_numpy(new), ranks, per_node)
    moves = plan_layer_moves(
        torch.from_numpy(old), torch.from_numpy(new), ranks, per_node
    )
    traffic = traffic_of_moves(moves, per_node)
    assert np.array_equal(traffic, _traffic_from_objects(plan, per_node))
    transfers = plan.transfers()
    assert traffic[RECV_INTRA].sum() + traffic[RECV_CROSS].sum() == len(transfers)
    assert traffic[SENT_INTRA].sum() == traffic[RECV_INTRA].sum()
    changed = sum(len(r.changed_slots) for r in plan.ranks)
    assert traffic[COPIES].sum() + len(transfers) == changed


def _small_fleet_cli(tmp_path, name: str, jobs: int, policies: str) -> dict:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "num_hidden_layers": 3,
                "num_experts": 16,
                "num_experts_per_tok": 2,
                "hidden_size": 64,
                "moe_intermediate_size": 32,
            }
        )
    )
    out = tmp_path / name
    argv = ["--fleet", "--model-config", str(config), "--synthetic", "40"]
    argv += ["--gpus", "4,8", "--gpus-per-node", "4", "--redundant", "0,8"]
    argv += ["--interval", "60,200", "--window", "100", "--steps-per-window", "10"]
    argv += ["--policies", policies, "--no-progress", "--out", str(out)]
    assert cli.main([*argv, "--jobs", str(jobs)]) == 0
    return json.loads((out / "report.json").read_text())


def test_two_jobs_give_the_report_of_one(tmp_path, capsys) -> None:
    policies = "default,balanced,balanced_spill,min_migration"
    if vllm_available():
        policies = "vllm," + policies
    one = _small_fleet_cli(tmp_path, "one", 1, policies)
    two = _small_fleet_cli(tmp_path, "two", 2, policies)
    # Only the columns that time a policy on this machine may differ.
    timed = {"stall_s", "stall_s_max", "stall_share", "policy_s_mean"}

    def untimed(report: dict) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in timed} for r in report["rows"]]

    assert len(one["rows"]) == 4 * 2 * len(policies.split(","))
    assert untimed(two) == untimed(one)
    assert two["series"] == one["series"]
    assert one["config"]["jobs"] == 1 and two["config"]["jobs"] == 2


def test_units_group_the_policies_that_share_plans() -> None:
    settings = [FleetSetting(8, 0, 100, 100, 4), FleetSetting(8, 8, 100, 100, 4)]
    policies = ["vllm", "balanced", "min_migration", "default", "balanced_spill"]
    units = make_units(settings, policies)
    assert [u.policies for u in units] == [
        ("vllm", "default"),
        ("balanced", "balanced_spill"),
        ("min_migration",),
    ] * 2
    assert [u.setting for u in units] == [settings[0]] * 3 + [settings[1]] * 3


def test_a_failing_unit_names_itself_from_the_worker() -> None:
    # A trace of the wrong geometry: replay raises in the worker process.
    inputs = SweepInputs(np.ones((4, 1, 3)), TINY, Links(), 10, 1.0, 0.01)
    units = make_units([FleetSetting(2, 0, 8, 8, 1)], ["default", "min_migration"])
    with pytest.raises(RuntimeError, match=r"failed at FleetSetting\(gpus=2") as info:
        run_sweep(units, inputs, jobs=2)
    assert "ValueError: trace is 1 layers x 3 experts" in str(info.value)
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_sweep(units, inputs, jobs=0)
