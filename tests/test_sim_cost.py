"""The cost model's terms on cases worked by hand, the device files, and the fits."""

from __future__ import annotations

import json

import pytest

from flover.engine import Request
from flover.runner import PolicyConfig
from flover.sim.cost import CostModel, StepShape, Work, head_work, layer_work
from flover.sim.device import DEVICES, device_from_record, load_device
from flover.sim.fit import PUBLISHED, Measured, fit_cpu, fit_layer_overhead, request_steps
from flover.sim.run import Plan, simulate
from flover.sim.shapes import ModelShape, model_shape
from reference import GPTConfig, Lane

# C = 4, d_mlp = 8, V = 10: small enough to count every byte by hand
TOY = ModelShape("toy", GPTConfig(n_layer=2, n_head=2, n_embd=4, vocab_size=10, n_ctx=32, n_inner=8))


def toy_device(**figures) -> dict:
    base = {"memory_gb": 1, "memory_bandwidth_gb_s": 1, "bandwidth_efficiency": 1, "compute_efficiency": 1,
            "overlap": 1, "layer_overhead_s": 0, "peak_tflops_fp16": 1e-3, "gpus_per_node": 8, "nvlink_gb_s": 200,
            "nvlink_latency_s": 1e-6, "infiniband_gb_s": 10, "infiniband_latency_s": 5e-6}  # fmt: skip
    base.update(figures)
    return {"name": "toy", "kind": "gpu", "dtype": "fp16",
            "figures": {k: {"value": v, "source": "a test"} for k, v in base.items()}}  # fmt: skip


def test_step_shape_counts_rows_lanes_cache_and_attention():
    lanes = [Lane.of([0], [5], 3), Lane.of([1], [1, 2, 3], 0)]  # a decode at position 3, a prefill of 3
    s = StepShape.of(lanes)
    assert (s.rows, s.lanes, s.cached) == (4, 2, 4 + 3)
    assert s.attended == 4 + (1 + 2 + 3)  # the decode attends over 4 positions; the prompt's rows over 1, 2, 3


def test_layer_ops_bytes_and_flops_by_hand():
    ops = layer_work(TOY, StepShape.decode(1, 3), tp=1, value_bytes=2)  # one row, 4 cached positions
    assert ops["qkv"] == Work(2 * (3 * 16 + (4 + 12)), 2 * 4 * 12)  # weights C x 3C, row in and out
    assert ops["attention"] == Work(2 * 2 * 4 * (4 + 2), 4 * 4 * 4)  # K and V of 4 positions, new K, V, q, out
    assert ops["attention_out"] == Work(2 * (16 + 8), 2 * 16)
    assert ops["mlp_in"] == Work(2 * (32 + 12), 2 * 32)
    assert ops["mlp_out"] == Work(2 * (32 + 12), 2 * 32)
    assert head_work(TOY, StepShape.decode(1, 3), 1, 2) == Work(2 * (40 + 4 + (8 + 10)), 2 * 40)
    half = layer_work(TOY, StepShape.decode(1, 3), tp=2, value_bytes=2)
    assert half["mlp_out"] == Work(2 * (16 + (4 + 4)), 32)  # row parallel: half the weights, the whole output


def test_roofline_takes_the_longer_term_and_without_overlap_their_sum():
    memory_bound = Work(bytes=3e9, flops=1e9)  # 3 s of memory at 1 GB/s, 1 s of math at 1 TFLOP/s
    for overlap, expected in ((1.0, 3.0), (0.0, 4.0), (0.5, 3.5)):
        cost = CostModel(device_from_record(toy_device(overlap=overlap, peak_tflops_fp16=1e-3)), TOY)
        assert cost.op_s(memory_bound, 1e9) == pytest.approx(expected)
        assert cost.op_s(memory_bound, 1e9, share=2) == pytest.approx(2 * expected)


def test_a_step_is_layers_times_ops_plus_head_plus_fixed_costs():
    device = device_from_record(toy_device(layer_overhead_s=1e-3, lane_overhead_s=1e-4))
    cost, s = CostModel(device, TOY), StepShape.decode(3, 5)
    rate = 1e9  # 1 TFLOP/s x efficiency 1 in the toy's units is 1e9 FLOP/s after the 1e-3 TFLOPS
    layer = sum(max(w.bytes / 1e9, w.flops / rate) for w in layer_work(TOY, s, 1, 2).values())
    head = head_work(TOY, s, 1, 2)
    expected = 2 * layer + max(head.bytes / 1e9, head.flops / rate) + 2 * 1e-3 + 3 * 1e-4
    assert cost.shape_s(s) == pytest.approx(expected)
    assert cost.shape_s(s, share=2) == pytest.approx(2 * (expected - 2e-3 - 3e-4) + 2e-3 + 3e-4)  # overheads unshared


def test_ring_all_reduce_within_a_node_and_across_nodes():
    one_node = CostModel(device_from_record(toy_device()), TOY, tp=2)
    # 2 ranks: 2(N-1) = 2 hops of 1 us; 2(N-1)/N = 1 x the bytes at 100 GB/s (half of NVLink's 200 both ways)
    assert one_node.all_reduce_s(1e6) == pytest.approx(2e-6 + 1e6 / 100e9)
    assert one_node.all_gather_s(1e6) == pytest.approx(1e-6 + 0.5e6 / 100e9)
    across = CostModel(device_from_record(toy_device()), TOY, tp=2, nodes=2)  # InfiniBand: 10 GB/s, 5 us a hop
    assert across.all_reduce_s(1e6) == pytest.approx(2 * 5e-6 + 1e6 / 10e9)
    s = StepShape.decode(1, 0)
    per_layer = 2 * across.all_reduce_s(4 * 2)  # one row of C = 4 fp16 values, twice a layer
    assert across.communication_s(s) == pytest.approx(2 * per_layer + across.all_gather_s(10 * 2))
    assert CostModel(device_from_record(toy_device()), TOY).communication_s(s) == 0


def test_the_shuffle_is_priced_by_the_bytes_it_reads_and_writes():
    cost = CostModel(device_from_record(toy_device(copy_bandwidth_gb_s=2)), TOY)
    per_position = 2 * 2 * 4 * 2  # K and V, 2 layers, C = 4, fp16
    assert cost.move_s([3, 5]) == pytest.approx(2 * 8 * per_position / 2e9)


def test_one_request_alone_takes_the_sum_of_its_steps():
    device = load_device("a100-80gb")
    plan = Plan(device, model_shape("gptj-6b"))
    run = simulate(plan, PolicyConfig("serial"), [Request(0, 0.5, tuple(range(8)), 20)])
    steps = sum(plan.cost().shape_s(s) for s in request_steps(8, 20))
    (result,) = run.results
    assert result.finish_s - result.arrival_s == pytest.approx(steps)


@pytest.mark.parametrize("name", ["a100-40gb", "a100-80gb", "h100-sxm", "h200"])
def test_gpu_files_cite_their_sources_and_fit_only_the_published_request(name):
    device = load_device(name)
    record = json.loads((DEVICES / f"{name}.json").read_text())
    assert all(entry["source"].strip() for entry in record["figures"].values())
    assert "datasheet" in device.sources["memory_bandwidth_gb_s"]
    # the only fitted figure is the a100-80gb's fit of the published request, kept on every GPU
    assert device.figure("layer_overhead_s") == pytest.approx(fit_layer_overhead(load_device("a100-80gb")), rel=1e-3)
    if name == "a100-80gb":
        plan = Plan(device, model_shape(PUBLISHED.model))
        alone = sum(plan.cost().shape_s(s) for s in request_steps(PUBLISHED.prompt_tokens, PUBLISHED.new_tokens))
        assert alone == pytest.approx(PUBLISHED.seconds, rel=1e-3)


def test_cpu_fit_recovers_the_figures_it_was_generated_from():
    truth = device_from_record({**toy_device(memory_bandwidth_gb_s=20, peak_tflops_fp32=0.2, overlap=0.3,
                                             layer_overhead_s=2e-4), "dtype": "fp32", "kind": "cpu"})  # fmt: skip
    shape = model_shape("gpt2")
    cost = CostModel(truth, shape)
    steps = [StepShape.decode(b, p) for b in (1, 4, 16, 64) for p in (16, 256, 768)]
    steps += [StepShape.prefill(n) for n in (8, 64, 256)]
    fit = fit_cpu(shape, [Measured("step", s, cost.shape_s(s)) for s in steps])
    assert fit.overlap == pytest.approx(0.3)
    assert fit.bandwidth == pytest.approx(20e9, rel=1e-3)
    assert fit.matmul_rate == pytest.approx(0.2e12, rel=1e-3)
    assert fit.layer_overhead_s == pytest.approx(2e-4, rel=1e-3)


def test_instances_on_one_device_share_its_memory_and_math_but_not_their_fixed_costs():
    plan = Plan(load_device("a100-80gb"), model_shape("gptj-6b"))
    cost = plan.cost()
    both = [Request(i, 0.0, (1, 2, 3, 4, 5, 6, 7, i), 50) for i in range(2)]
    run = simulate(plan, PolicyConfig("instances", instances=2), both)
    first, second = sorted(run.results, key=lambda r: r.instance)
    assert (first.instance, second.instance) == (0, 1)
    assert first.finish_s == pytest.approx(second.finish_s, rel=1e-2)  # side by side, neither ahead
    shared = sum(2 * cost.compute_s(s) + cost.overhead_s(s) for s in request_steps(8, 50))
    assert first.finish_s == pytest.approx(shared, rel=2e-2)
    alone = sum(cost.shape_s(s) for s in request_steps(8, 50))
    assert alone < first.finish_s < 2 * alone  # faster than one after the other: the fixed costs overlap


def cpu_device(cores: int, **figures) -> dict:
    """A CPU with all-core figures 4x the one-thread ones, and a fixed cost per layer that grows with threads."""
    base = {"memory_gb": 8, "memory_bandwidth_gb_s": 40, "bandwidth_efficiency": 1, "compute_efficiency": 1,
            "overlap": 0.5, "layer_overhead_s": 2e-4, "peak_tflops_fp32": 0.4, "attention_efficiency": 0.5, "cores": cores,
            "memory_bandwidth_gb_s_one_thread": 10, "matmul_tflops_one_thread": 0.1, "attention_tflops_one_thread": 0.05,
            "overlap_one_thread": 0.1, "layer_overhead_s_one_thread": 1e-4}  # fmt: skip
    base.update(figures)
    return {"name": "cpu-test", "kind": "cpu", "dtype": "fp32",
            "figures": {k: {"value": v, "source": "a test"} for k, v in base.items()}}  # fmt: skip


def test_a_cpu_on_fewer_threads_lies_between_its_one_thread_and_all_core_figures():
    cpu = device_from_record(cpu_device(4))
    assert cpu.with_threads(4) is cpu and cpu.with_threads(9) is cpu
    one = cpu.with_threads(1)
    assert one.figure("memory_bandwidth_gb_s") == pytest.approx(10)
    assert one.peak_flops("fp32") * one.figure("compute_efficiency") == pytest.approx(0.1e12)
    assert one.peak_flops("fp32") * one.figure("attention_efficiency") == pytest.approx(0.05e12)
    assert (one.figure("overlap"), one.figure("layer_overhead_s"), one.figure("cores")) == pytest.approx((0.1, 1e-4, 1))
    # two of four threads: seconds per byte a + b / t through (1, 1/10 GB/s) and (4, 1/40 GB/s): 1 / 16 GB/s
    two = cpu.with_threads(2)
    assert 1 / two.figure("memory_bandwidth_gb_s") == pytest.approx(1 / 10 + (1 / 40 - 1 / 10) * (1 / 2) / (3 / 4))
    assert two.figure("layer_overhead_s") == pytest.approx(1e-4 + 1e-4 * (2 / 3))
    assert "between the one-thread" in two.sources["overlap"] and "a test" in two.sources["memory_gb"]
    assert not two.has("matmul_tflops_one_thread")  # its own figures: no second interpolation from them
    gpu = load_device("a100-80gb")
    assert gpu.with_threads(1) is gpu


def test_instances_on_a_cpu_each_run_on_their_own_cores():
    """Two instances on two cores: each step priced at one thread, side by side without slowing each other."""
    cpu = device_from_record(cpu_device(2))
    plan = Plan(cpu, model_shape("gpt2"))
    both = [Request(i, 0.0, (1, 2, 3, 4, 5, 6, 7, i), 20) for i in range(2)]
    run = simulate(plan, PolicyConfig("instances", instances=2), both)
    one_thread = CostModel(cpu.with_threads(1), plan.shape)
    alone = sum(one_thread.shape_s(s) for s in request_steps(8, 20))
    assert [r.finish_s for r in run.results] == pytest.approx([alone, alone], rel=1e-6)
    assert alone > 2 * sum(plan.cost().shape_s(s) for s in request_steps(8, 20))  # math-bound: 4x slower
    pricing = plan.instance_pricing(4)  # four on two cores: one thread each, and twice the demand
    assert [pricing(busy)[1] for busy in (1, 2, 4)] == [1.0, 1.0, 2.0]
    assert pricing(4)[0].device.figure("cores") == 1


ALONE = {"memory_bandwidth_gb_s_one_thread_alone": 20, "matmul_tflops_one_thread_alone": 0.2,
         "attention_tflops_one_thread_alone": 0.1, "overlap_one_thread_alone": 0.1,
         "layer_overhead_s_one_thread_alone": 1e-4}  # fmt: skip


def test_an_instance_runs_at_its_alone_figures_while_the_others_wait_and_beside_them_while_they_run():
    """Busy neighbours share a CPU's caches and memory: calibrated apart, priced apart."""
    cpu = device_from_record(cpu_device(2, **ALONE))
    alone, beside = cpu.with_threads(1, alone=True), cpu.with_threads(1)
    assert (alone.figure("memory_bandwidth_gb_s"), beside.figure("memory_bandwidth_gb_s")) == pytest.approx((20, 10))
    assert "(alone)" in alone.sources["overlap"] and "beside busy neighbours" in beside.sources["overlap"]
    assert device_from_record(cpu_device(2)).with_threads(1, alone=True).figures == beside.figures  # no alone figures
    plan = Plan(cpu, model_shape("gpt2"))
    pricing = plan.instance_pricing(2)
    assert pricing(1)[0].device.figures == alone.figures and pricing(2)[0].device.figures == beside.figures
    steps = request_steps(8, 20)
    one = simulate(plan, PolicyConfig("instances", instances=2), [Request(0, 0.0, (1, 2, 3, 4, 5, 6, 7, 8), 20)])
    assert one.results[0].finish_s == pytest.approx(sum(CostModel(alone, plan.shape).shape_s(s) for s in steps))
    both = [Request(i, 0.0, (1, 2, 3, 4, 5, 6, 7, i), 20) for i in range(2)]
    two = simulate(plan, PolicyConfig("instances", instances=2), both)
    by_beside = sum(CostModel(beside, plan.shape).shape_s(s) for s in steps)
    assert [r.finish_s for r in two.results] == pytest.approx([by_beside, by_beside], rel=1e-6)
    assert by_beside > 1.2 * one.results[0].finish_s


def test_kv_memory_is_counted_at_the_plans_data_type():
    """--kv-memory 1 GiB at fp16 holds twice the positions it holds at fp32, and the run reports fp16 bytes."""
    requests = [Request(i, 0.0, (1, 2, 3), 4) for i in range(3)]
    runs = {}
    for dtype in ("fp16", "fp32"):
        plan = Plan(device_from_record(toy_device(peak_tflops_fp32=1e-3, memory_gb=64)), model_shape("gpt2"), dtype=dtype)
        pc = PolicyConfig("fused", kv="paged", block_size=16, kv_memory_gib=1.0)
        runs[dtype] = simulate(plan, pc, requests)
        assert runs[dtype].config == pc  # reported under the policy as given
    per_position = model_shape("gpt2").kv_bytes_per_position("fp16")
    assert runs["fp16"].metrics["kv_budget_bytes"] == 2**30 // (per_position * 16) * per_position * 16
    assert runs["fp32"].metrics["kv_budget_bytes"] == runs["fp16"].metrics["kv_budget_bytes"]
    # the same positions held, at half the bytes each
    assert runs["fp16"].metrics["kv_peak_bytes"] * 2 == runs["fp32"].metrics["kv_peak_bytes"] > 0
