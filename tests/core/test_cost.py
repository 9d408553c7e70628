"""Tests for ragtune.flops and ragtune.ledger: the analytic FLOP formulas are checked against
torch.utils.flop_counter.FlopCounterMode on tiny models built from config (no network), and the
Ledger's shared charging call, bookkeeping and exact state round trip."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

transformers = pytest.importorskip("transformers")

from ragtune.flops import ModelShape, backward_flops, forward_flops, generate_flops, train_flops  # noqa: E402
from ragtune.ledger import ACTIVITIES, TRAINING_KINDS, Ledger, device_name, join_device_names  # noqa: E402

B, L = 2, 7


def counted(fn) -> int:
    mode = FlopCounterMode(display=False)
    with mode:
        fn()
    return int(mode.get_total_flops())


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return transformers.BertModel(cfg)  # with pooler (one Linear on token 0)


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(cfg)  # Conv1D layers, tied LM head


def ids(b: int = B, n: int = L) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 100, (b, n), generator=g)


# ----------------------------------------------------------------- shape


def test_model_shape_counts_bert():
    m = tiny_bert()
    s = ModelShape.of(m)
    # per layer: Q,K,V,O 4*32*32 + FFN 2*32*64 = 8192; pooler 32*32 kept apart
    assert s == ModelShape(
        n_layers=2,
        d_attn=32,
        matmul_params=2 * 8192,
        trainable_matmul_params=2 * 8192,
        head_params=0,
        pooler_params=1024,
        trainable_pooler_params=1024,
    )
    assert ModelShape.of(m, n_layers=2, d_attn=32) == s


def test_model_shape_counts_llama_gqa():
    s = ModelShape.of(tiny_llama())
    # per layer: q,o 32*32 each; k,v 32*16 each (2 kv heads); mlp 3*32*64; head 100*32
    per_layer = 2 * 1024 + 2 * 512 + 3 * 2048
    assert s.n_layers == 2 and s.d_attn == 32
    assert s.matmul_params == 2 * per_layer + 3200
    assert s.head_params == 3200 and s.pooler_params == 0


def test_model_shape_counts_zero3_partitioned_weights_at_their_full_size():
    """Under ZeRO-3 a weight outside its module's forward is an empty local tensor with the full
    size in `ds_numel` (what DeepSpeed sets): the shape is the unpartitioned model's."""
    m = tiny_bert()
    want = ModelShape.of(m)
    with torch.no_grad():
        for p in m.parameters():
            p.ds_numel = p.numel()
            p.data = torch.empty(0)
    assert ModelShape.of(m) == want


# ----------------------------------------------------------------- forward


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama, tiny_gpt2])
def test_forward_formula_exact(make):
    m = make().eval()
    x = ids()
    with torch.no_grad():
        c = counted(lambda: m(input_ids=x))
    assert forward_flops(ModelShape.of(m), [L] * B) == c


def test_forward_padding_counts_padded_positions():
    """Padding policy: FLOPs follow the padded tensor, not the real tokens."""
    m = tiny_bert().eval()
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    with torch.no_grad():
        c = counted(lambda: m(input_ids=x, attention_mask=mask))
    assert forward_flops(ModelShape.of(m), [x.shape[1]] * x.shape[0]) == c  # padded, not 2*L-3 real tokens


def test_forward_mixed_lengths_sum_per_sequence():
    m = tiny_llama().eval()
    s = ModelShape.of(m)
    with torch.no_grad():
        c = counted(lambda: (m(input_ids=ids(1, 5)), m(input_ids=ids(1, 9))))
    assert forward_flops(s, [5, 9]) == c


# ----------------------------------------------------------------- training


def test_full_training_bert_exact():
    m = tiny_bert().train()
    x = ids()

    def step():
        out = m(input_ids=x)
        (out.last_hidden_state.sum() + out.pooler_output.sum()).backward()

    s = ModelShape.of(m)
    assert counted(step) == train_flops(s, [L] * B)
    assert backward_flops(s, [L] * B) == 2 * forward_flops(s, [L] * B)  # 6N rule


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_full_training_causal_lm_exact(make):
    m = make().train()
    x = ids()
    s = ModelShape.of(m)
    c = counted(lambda: m(input_ids=x, labels=x).loss.backward())
    assert c == forward_flops(s, [L] * B) + backward_flops(s, [L] * B)
    assert train_flops(s, [L] * B) == 3 * forward_flops(s, [L] * B)


def test_frozen_model_scores_forward_only():
    m = tiny_llama().eval()
    m.requires_grad_(False)
    s = ModelShape.of(m)
    assert s.trainable_matmul_params == 0
    x = ids()
    with torch.no_grad():
        c = counted(lambda: m(input_ids=x))
    assert c == forward_flops(s, [L] * B)
    led = Ledger(device_name="d")  # the shared charging call: a frozen model under grad mode is scored
    assert led.charge_model("ref", s, [L] * B, real_tokens=B * L, seconds=0.0) == c
    assert led.charge_model("doc", s, [L] * B, real_tokens=B * L, seconds=0.0, activity="index") == c
    assert led.totals()["flops_by_component"] == {"ref": {"score": c}, "doc": {"index": c}}


def _lora_llama():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(tiny_llama(), cfg)


def test_lora_forward_exact_and_shape():
    m = _lora_llama().eval()
    s = ModelShape.of(m)
    # lora_A: 32->4, lora_B: 4->out (q: 32, v: 16) on 2 layers
    lora = 2 * ((32 * 4 + 4 * 32) + (32 * 4 + 4 * 16))
    assert s.trainable_matmul_params == lora
    assert s.matmul_params == ModelShape.of(tiny_llama()).matmul_params + lora
    x = ids()
    with torch.no_grad():
        c = counted(lambda: m(input_ids=x))
    assert forward_flops(s, [L] * B) == c


def test_lora_training_within_documented_upper_bound():
    m = _lora_llama().train()
    s = ModelShape.of(m)
    x = ids()
    c = counted(lambda: m(input_ids=x, labels=x).loss.backward())
    f = train_flops(s, [L] * B)
    # autograd skips input-grads below the first LoRA layer: formula is an upper bound
    assert f >= c
    assert f <= 1.35 * c


# ----------------------------------------------------------------- generation


def test_generate_formula_exact_llama():
    m = tiny_llama().eval()
    x = ids()
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=True)
    out = {}

    def gen():
        out["seq"] = m.generate(x, attention_mask=torch.ones_like(x), **kw)

    c = counted(gen)
    n_new = out["seq"].shape[1] - L
    assert n_new == 3
    s = ModelShape.of(m)
    assert generate_flops(s, [L] * B, [n_new] * B) == c
    # without the logits_to_keep=1 prefill saving the formula over-counts by the head
    full = generate_flops(s, [L] * B, [n_new] * B, logits_to_keep=None)
    assert full - c == B * 2 * s.head_params * (L - 1)
    led = Ledger(device_name="d")
    assert led.charge_model("gen", s, [L] * B, new_tokens=[n_new] * B, real_tokens=0, seconds=0.0) == c
    assert led.totals()["tokens_by_component"] == {"gen": {"generate": B * (L + n_new)}}


def test_generate_left_padded_batch_exact():
    m = tiny_llama().eval()
    x = ids()
    mask = torch.ones_like(x)
    x[1, :3] = 0  # left padding
    mask[1, :3] = 0
    c = counted(
        lambda: m.generate(x, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=True)
    )
    assert generate_flops(ModelShape.of(m), [L] * B, [4] * B) == c


# ----------------------------------------------------------------- ledger


def test_ledger_accumulates_per_component_and_kind():
    led = Ledger(device_name="test-device")
    led.charge("retriever", "train", tokens=10, flops=100)
    led.charge("retriever", "train", tokens=5, flops=50, real_tokens=4, seconds=0.5)
    led.charge("retriever", "index", tokens=20, flops=7)
    led.charge("generator", "score", tokens=3, flops=1.5)
    led.charge("generator", "generate", tokens=6, flops=30, calls=2)
    t = led.totals()
    assert t["flops"]["train"] == 150 and t["flops"]["index"] == 7
    assert t["flops"]["score"] == 1.5 and t["flops"]["generate"] == 30 and t["flops"]["eval"] == 0
    assert t["flops"]["total_train"] == t["flops"]["total"] == 188.5
    assert t["flops_by_component"] == {
        "generator": {"generate": 30, "score": 1.5},
        "retriever": {"index": 7, "train": 150},
    }
    assert t["tokens"]["train"] == 15 and t["real_tokens"]["train"] == 14
    assert t["calls"]["train"] == 2 and t["calls"]["generate"] == 2
    assert t["forward_seconds"]["train"] == 0.5 and "seconds" not in t
    assert t["device"] == "test-device"
    assert set(ACTIVITIES) <= set(t["flops"])
    assert t["flops"]["total_train"] == sum(t["flops"][a] for a in TRAINING_KINDS)


def test_evaluating_reroutes_to_eval_and_is_excluded_from_train_total():
    led = Ledger(device_name="d")
    led.charge("gen", "train", tokens=1, flops=10)
    with led.evaluating():
        led.charge("gen", "generate", tokens=1, flops=1000)
        with led.evaluating():  # nestable
            led.charge("ret", "score", tokens=1, flops=5)
    led.charge("gen", "train", tokens=1, flops=0)  # outside again: not eval
    t = led.totals()
    assert t["flops"]["eval"] == 1005 and t["flops"]["generate"] == 0
    assert t["flops"]["total_train"] == 10 and t["flops"]["total"] == 1015
    assert t["flops_by_component"]["gen"] == {"eval": 1000, "train": 10}


def test_unknown_activity_raises():
    led = Ledger(device_name="d")
    with pytest.raises(ValueError):
        led.charge("gen", "training", tokens=1, flops=1)
    with pytest.raises(ValueError):
        led.charge_model("gen", ModelShape(1, 1, 1, 0), [1], real_tokens=1, seconds=0.0, activity="bogus")
    with pytest.raises(ValueError):
        led.charge("gen", "train", tokens=1, flops=-1)
    with pytest.raises(ValueError):
        led.charge("", "train", tokens=1, flops=1)


def _busy_ledger() -> Ledger:
    led = Ledger(device_name="cpu: test x 1 cores")
    s = ModelShape(n_layers=32, d_attn=4096, matmul_params=7_000_000_000, trainable_matmul_params=40_000_000)
    for i in range(50):  # sums beyond 2**53 stay exact (ints)
        led.charge_model("generator", s, [2048 + i] * 8, real_tokens=8 * 2048, seconds=0.0, activity="train")
        led.charge("retriever", "score", tokens=3, flops=0.1 * (i + 1), seconds=1e-3 * i)
    with led.evaluating():
        led.charge_model("generator", s, [100] * 4, new_tokens=[20] * 4, real_tokens=400, seconds=0.0)
    with led.wall("train"):
        led.sample_memory()
    return led


def test_state_dict_round_trip_json_and_torch():
    led = _busy_ledger()
    assert led.totals()["flops"]["train"] > 2**53
    sd = led.state_dict()

    via_json = Ledger(device_name="other")
    via_json.load_state_dict(json.loads(json.dumps(sd)))
    assert via_json.totals() == led.totals()
    assert via_json.state_dict() == sd

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    via_torch = Ledger(device_name="other")
    via_torch.load_state_dict(torch.load(buf, weights_only=True))
    assert via_torch.totals() == led.totals()

    assert led.copy().totals() == led.totals()


def test_resume_equals_uninterrupted_run():
    s = ModelShape(n_layers=2, d_attn=32, matmul_params=21632, trainable_matmul_params=21632)
    lens = [[7, 7], [9, 9, 9], [3], [12, 12]]

    def run(led, steps):
        for ls in steps:
            t0 = time.perf_counter()
            led.charge("gen", "train", tokens=sum(ls), flops=train_flops(s, ls), seconds=time.perf_counter() - t0)
            led.charge("ret", "score", tokens=1, flops=0.1)

    full = Ledger(device_name="d")
    run(full, lens)
    first = Ledger(device_name="d")
    run(first, lens[:2])
    resumed = Ledger(device_name="d")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    run(resumed, lens[2:])
    assert resumed.deterministic_view() == full.deterministic_view()
    assert "forward_seconds" not in full.deterministic_view()


def test_wall_phases_memory_and_device_hours():
    led = Ledger(device_name="d", n_devices=2)
    with led.wall("train"):
        time.sleep(0.01)
        with led.wall("index"):
            time.sleep(0.01)
    t = led.totals()
    w = t["wall_seconds"]
    assert w["index"] >= 0.01 and w["train"] >= w["index"] + 0.01
    assert w["total"] == pytest.approx(w["train"])  # nested phases not double counted
    assert t["device_hours"] == pytest.approx(w["total"] * 2 / 3600)
    assert t["peak_memory_bytes"]["cpu"] > 0


def test_merge_adds_counts():
    a, b = Ledger(device_name="d"), Ledger(device_name="d")
    a.charge("gen", "train", tokens=2, flops=10)
    b.charge("gen", "train", tokens=3, flops=5)
    b.charge("ret", "index", tokens=1, flops=1)
    a.merge(b)
    t = a.totals()
    assert t["flops"]["train"] == 15 and t["tokens"]["train"] == 5 and t["flops"]["index"] == 1
    assert t["device"] == "d"


def test_device_name_cpu():
    name = device_name("cpu")
    assert isinstance(name, str) and name.startswith("cpu: ") and name.endswith("cores")
    assert device_name(torch.device("cpu")) == name
    assert isinstance(Ledger().device_name, str) and Ledger().device_name


def test_head_positions_exact_for_forward_and_training():
    """The LM head on the last T positions only (what the generator's answer scoring runs)."""
    m = tiny_llama()
    s, T, x = ModelShape.of(m), 3, ids()

    def run():
        h = m.model(input_ids=x).last_hidden_state[:, -T:]  # (B, T, H)
        return m.lm_head(h)

    with torch.no_grad():
        c = counted(run)
    assert forward_flops(s, [L] * B, head_positions=T) == c
    assert forward_flops(s, [L] * B) - c == B * 2 * s.head_params * (L - T)
    m.train()
    assert counted(lambda: run().sum().backward()) == train_flops(s, [L] * B, head_positions=T)
    m.zero_grad(set_to_none=True)
    m.model.requires_grad_(False)  # only the head trains
    s_head = ModelShape.of(m)
    assert s_head.trainable_head_params == s_head.trainable_matmul_params == s.head_params
    # the frozen body needs no grads at all: the formula is an upper bound there, as documented
    assert backward_flops(s_head, [L] * B, head_positions=T) >= counted(lambda: run().sum().backward()) - c


def test_charge_model_decides_train_vs_score_once():
    s = ModelShape(n_layers=2, d_attn=8, matmul_params=100, trainable_matmul_params=100)
    frozen = ModelShape(n_layers=2, d_attn=8, matmul_params=100, trainable_matmul_params=0)
    led = Ledger(device_name="d")
    with torch.enable_grad():
        assert led.charge_model("a", s, [4], real_tokens=3, seconds=0.1) == train_flops(s, [4])
        assert led.charge_model("b", frozen, [4], real_tokens=3, seconds=0.1) == forward_flops(s, [4])
    with torch.no_grad():
        assert led.charge_model("a", s, [4], real_tokens=3, seconds=0.1) == forward_flops(s, [4])
    t = led.totals()
    assert t["flops_by_component"] == {
        "a": {"score": forward_flops(s, [4]), "train": train_flops(s, [4])},
        "b": {"score": forward_flops(s, [4])},
    }
    assert t["tokens"]["train"] == 4 and t["real_tokens"]["train"] == 3
    assert t["forward_seconds"]["score"] == pytest.approx(0.2)


def test_join_device_names_and_merge():
    assert join_device_names("A", "B") == "A + B"
    assert join_device_names("A + B", "B + C") == "A + B + C"
    assert join_device_names("", "A") == "A" and join_device_names("A", "") == "A"
    a, b = Ledger(device_name="A"), Ledger(device_name="B")
    assert a.merge(b).device_name == "A + B" and a.merge(b).device_name == "A + B"
    assert set(TRAINING_KINDS) == set(ACTIVITIES) - {"eval"}
