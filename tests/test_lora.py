"""finetune/lora.py against peft on tiny random HF Llama/Qwen3/Gemma models: init, forward, gradients,
AdamW steps, PEFT export/import, merge, resume of the PiSSA base, config errors."""

import json

import peft.tuners.lora.layer as peft_layer
import pytest
import torch
import torch.nn.functional as F
from conftest import LLAMA_FEATURES, TINY_GPT, tiny_gpt, tiny_hf_llama
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_checkpoint
from finetune.lora import (
    LoRAConfig,
    _peft_keys,
    apply_lora,
    load_lora_state_dict,
    load_peft_adapter,
    lora_init_state,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    restore_base_from_init,
    save_peft_adapter,
)
from model import GPT, ModelConfig

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTIAL = ("q_proj", "v_proj", "up_proj", "down_proj")
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}


# case -> tiny_hf_llama overrides: Llama at GQA ratios 1, 2 and 4, a tied Qwen3 with head_dim 12, and a
# tied Gemma (GeGLU: gate_proj and up_proj are slices of c_fc as in SwiGLU) with head_dim 12
CASES = {
    "llama_gqa1": dict(num_key_value_heads=4, rope_parameters=LLAMA31_ROPE),
    "llama_gqa2": dict(num_key_value_heads=2, rope_parameters=LLAMA31_ROPE),
    "llama_gqa4": dict(num_key_value_heads=1, rope_parameters=LLAMA31_ROPE),
    "qwen3": dict(qwen3=True, intermediate_size=40, head_dim=12, tie_word_embeddings=True),
    "gemma": dict(gemma=True, intermediate_size=40, head_dim=12, tie_word_embeddings=True),
}


def _base(case: str, tmp_path) -> str:
    """Save a randomised tiny HF model; return its folder."""
    return tiny_hf_llama(tmp_path / f"base_{case}", seed=1, std=0.1, **CASES[case])


def _aligned(hf: torch.nn.Module) -> torch.nn.Module:
    """Copy every parameter into fresh (64-byte aligned) memory.

    Loaded tensors can sit at odd offsets of the safetensors buffer (ours: the unfused linears; HF's:
    all), and MKL's float32 GEMM rounds differently on unaligned input on some CPUs (measured on an AMD
    EPYC with AVX2: svd_lowrank's factors differ by ~1e-7 for the same values). The math is the same;
    bitwise comparisons need both sides at the same alignment."""
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
    return hf


def _peft(path: str, cfg: LoRAConfig, init) -> torch.nn.Module:
    hf = _aligned(AutoModelForCausalLM.from_pretrained(path))
    pc = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        use_rslora=cfg.use_rslora,
        init_lora_weights=init,
    )
    return get_peft_model(hf, pc)


def _pairs(ours: GPT, peft_model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(our adapter parameter, peft's) for every adapter factor."""
    theirs = dict(peft_model.named_parameters())
    out = []
    for (mname, n), key in _peft_keys(ours).items():
        m = dict(lora_modules(ours))[mname]
        if n in m.lora_A:
            out.append((m.lora_A[n], theirs[key + ".lora_A.default.weight"]))
            out.append((m.lora_B[n], theirs[key + ".lora_B.default.weight"]))
    return out


def _residuals(ours: GPT, peft_model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    theirs = dict(peft_model.named_parameters())
    out = []
    for (mname, n), key in _peft_keys(ours).items():
        m = dict(lora_modules(ours))[mname]
        out.append((m.weight[m.row_range(n)], theirs[key + ".base_layer.weight"]))
    return out


def _idx(vocab: int = 96, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rslora,init", [(False, "pissa"), (True, "pissa"), (True, "pissa_niter_2")])
def test_pissa_init_bitwise_equal_to_peft(case, rslora, init, tmp_path, monkeypatch):
    """A, B and the residual base of every slice are bitwise peft's (alpha != r).

    For pissa_niter_N, peft's svd_lowrank draws from torch's global RNG; we wrap it to seed torch with
    seed + k before its k-th call (HF module order), which is what our own per-slice generator does.
    """
    path = _base(case, tmp_path)
    cfg = LoRAConfig(r=4, alpha=12, use_rslora=rslora, init=init, target_modules=ALL)
    calls = []

    def seeded_svd_lowrank(*args, **kwargs):
        torch.manual_seed(7 + len(calls))
        calls.append(1)
        return torch.svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft_layer, "svd_lowrank", seeded_svd_lowrank)
    theirs = _peft(path, cfg, init)
    ours = apply_lora(_aligned(hf_checkpoint.from_hf(path)), cfg, seed=7)
    pairs = _pairs(ours, theirs)
    assert len(pairs) == 2 * 7 * 2
    for a, b in pairs + _residuals(ours, theirs):
        assert torch.equal(a, b)
    assert len(calls) == (14 if "niter" in init else 0)


def _train_compare(ours: GPT, theirs, vocab: int, steps: int = 5) -> None:
    """Logits within 2e-6 and every LoRA gradient within 1e-6 at the start; logits within 1e-5 after `steps`
    AdamW steps. 2e-6 is the rounding floor: PiSSA's W_res x + s B (A x) is itself up to 1.2e-6 away from
    the base model's W x in peft (measured on an AMD EPYC, where ours and peft differ by up to 1.04e-6;
    below 1e-6 on an Intel CPU), and ours adds the adapter to the base output in another order (addmm)."""
    idx, tgt = _idx(vocab), _idx(vocab, seed=4)
    pairs = _pairs(ours, theirs)
    opt_o = torch.optim.AdamW([p for p, _ in pairs], lr=1e-2, weight_decay=0.01)
    opt_t = torch.optim.AdamW([p for _, p in pairs], lr=1e-2, weight_decay=0.01)
    for step in range(steps + 1):
        lo, _ = ours(idx)
        lt = theirs(input_ids=idx).logits
        torch.testing.assert_close(lo, lt, atol=2e-6 if step == 0 else 1e-5, rtol=0)
        if step == steps:
            break
        F.cross_entropy(lo.flatten(0, 1), tgt.flatten()).backward()
        F.cross_entropy(lt.flatten(0, 1), tgt.flatten()).backward()
        if step == 0:
            for p, q in pairs:
                torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=0)
        opt_o.step()
        opt_t.step()
        opt_o.zero_grad()
        opt_t.zero_grad()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("targets", [ALL, PARTIAL])
def test_pissa_training_matches_peft(case, targets, tmp_path):
    path = _base(case, tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, use_rslora=True, init="pissa", target_modules=targets)
    theirs = _peft(path, cfg, "pissa")
    ours = apply_lora(_aligned(hf_checkpoint.from_hf(path)), cfg)
    assert {id(p) for p in lora_parameters(ours)} == {id(p) for p in ours.parameters() if p.requires_grad}
    _train_compare(ours, theirs, 96)


@pytest.mark.parametrize("init,peft_init", [("default", True), ("gaussian", "gaussian")])
def test_default_and_gaussian_init_match_peft_when_A_is_copied(init, peft_init, tmp_path):
    path = _base("llama_gqa2", tmp_path)
    cfg = LoRAConfig(r=4, alpha=6, init=init, target_modules=PARTIAL)
    theirs = _peft(path, cfg, peft_init)
    ours = apply_lora(_aligned(hf_checkpoint.from_hf(path)), cfg)
    for p, q in _pairs(ours, theirs):
        assert p.shape == q.shape
        if p.size(0) == cfg.r:  # A: our own draw has peft's distribution; copy peft's
            if init == "gaussian":  # N(0, 1/r): 128+ draws, std within 25%
                assert 0.75 / cfg.r < p.std() < 1.25 / cfg.r
            else:  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
                assert p.abs().max() <= 1 / p.size(1) ** 0.5 and p.std() > 0
            with torch.no_grad():
                p.copy_(q)
        else:
            assert not p.any() and not q.any()  # B starts at zero
    _train_compare(ours, theirs, 96)


def test_gpt2_shape_against_unfused_reference():
    """GPT-2 c_attn (q, k, v with biases): each slice equals its own unfused LoRA linear, forward and
    backward (peft's GPT-2 oracle would adapt the fused Conv1D, a different function)."""
    torch.manual_seed(0)
    model = tiny_gpt(block_size=32, n_layer=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(r=2, alpha=3, init="pissa", target_modules=("q_proj", "v_proj", "up_proj", "o_proj"))
    apply_lora(model, cfg)
    m = model.h[0].attn.c_attn
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = m(x)
    ref, start = [], 0
    w0, b0 = original["h.0.attn.c_attn.weight"], original["h.0.attn.c_attn.bias"]
    for n in ("q_proj", "k_proj", "v_proj"):
        rows = slice(start, start + 16)
        start += 16
        out = F.linear(x, w0[rows], b0[rows])  # the ORIGINAL slice: PiSSA leaves the function unchanged
        if n in m.lora_A:
            a, b = m.lora_A[n], m.lora_B[n]
            out = out - cfg.scaling * F.linear(F.linear(x, a.detach()), b.detach())  # minus the initial BA
            out = out + cfg.scaling * F.linear(F.linear(x, a), b)
        ref.append(out)
    ref = torch.cat(ref, -1)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, m.lora_A["q_proj"], m.lora_B["v_proj"]], gy)
    grads_ref = torch.autograd.grad(ref, [x, m.lora_A["q_proj"], m.lora_B["v_proj"]], gy)
    for g, h in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="GPT-2"):
        save_peft_adapter(model, cfg, "/nonexistent/never", "gpt2")


def _perturb_B(model: GPT, seed: int = 5) -> None:
    """Stand-in for training: nonzero B everywhere, so every adapter changes the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init,convert", [("default", False), ("pissa", True), ("pissa", False)])
def test_export_loads_in_peft(init, convert, tmp_path):
    path = _base("llama_gqa2", tmp_path)
    cfg = LoRAConfig(r=4, alpha=12, use_rslora=True, init=init, target_modules=PARTIAL)
    ours = apply_lora(hf_checkpoint.from_hf(path), cfg).eval()
    _perturb_B(ours)
    save_peft_adapter(ours, cfg, str(tmp_path / "adapter"), path, convert_pissa_to_original_base=convert)
    base = path
    if init == "pissa" and not convert:
        base = str(tmp_path / "residual")
        hf_checkpoint.to_hf(ours, base)  # the adapter as trained applies to the residual base
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "adapter")
    )
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=idx).logits, ours(idx)[0], atol=1e-5, rtol=0)
    r = peft_model.peft_config["default"].r
    assert r == (2 * cfg.r if convert else cfg.r)


def test_peft_adapter_imports_with_equal_logits(tmp_path):
    path = _base("qwen3", tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=("k_proj", "o_proj", "gate_proj", "down_proj"))
    theirs = _peft(path, cfg, "gaussian")
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    theirs.save_pretrained(str(tmp_path / "peft_adapter"))
    ours = hf_checkpoint.from_hf(path)
    got = load_peft_adapter(ours, str(tmp_path / "peft_adapter"))
    assert (got.r, got.alpha, got.target_modules) == (4, 8, cfg.target_modules)
    idx = _idx()
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(input_ids=idx).logits, atol=1e-6, rtol=0)
    (tmp_path / "bad").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json"):
        load_peft_adapter(hf_checkpoint.from_hf(path), str(tmp_path / "bad"))


def test_merge_is_exact_and_exports(tmp_path):
    path = _base("llama_gqa4", tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, init="pissa", target_modules=ALL)
    ours = apply_lora(hf_checkpoint.from_hf(path), cfg).eval()
    _perturb_B(ours)
    idx = _idx()
    with torch.no_grad():
        expected = ours(idx)[0]
        merged = merge_lora(ours)
        assert not lora_modules(merged) and all(p.requires_grad for p in merged.parameters())
        torch.testing.assert_close(merged(idx)[0], expected, atol=1e-5, rtol=0)
        hf_checkpoint.to_hf(merged, str(tmp_path / "merged"))
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
        torch.testing.assert_close(hf(input_ids=idx).logits, expected, atol=1e-5, rtol=0)


def test_resume_rebuilds_pissa_base_bitwise(tmp_path):
    path = _base("llama_gqa2", tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, init="pissa_niter_3", target_modules=PARTIAL)
    first = apply_lora(hf_checkpoint.from_hf(path), cfg, seed=11)
    init = lora_init_state(first)
    _perturb_B(first)
    trained = {k: v.clone() for k, v in lora_state_dict(first).items()}

    resumed = apply_lora(hf_checkpoint.from_hf(path), cfg, seed=999, init_state=init)  # no SVD, different seed
    load_lora_state_dict(resumed, trained)
    sd1, sd2 = first.state_dict(), resumed.state_dict()
    assert sd1.keys() == sd2.keys()
    for k in sd1:
        assert torch.equal(sd1[k], sd2[k]), k

    again = apply_lora(hf_checkpoint.from_hf(path), LoRAConfig(r=4, alpha=8, init="default", target_modules=PARTIAL))
    again.lora_config = cfg
    restore_base_from_init(again, init)
    for k, v in again.state_dict().items():
        assert torch.equal(v, sd1[k]) or ".lora_" in k, k
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(resumed, {k: v for k, v in trained.items() if "q_proj" not in k})


def test_bf16_base_keeps_fp32_adapters():
    torch.manual_seed(0)
    model = GPT(
        ModelConfig(
            vocab_size=64,
            block_size=32,
            n_layer=1,
            n_head=2,
            n_embd=16,
            mlp="swiglu",
            norm="rmsnorm",
            position_embedding="rope",
            bias=False,
        )
    ).to(torch.bfloat16)
    apply_lora(model, LoRAConfig(r=2, init="pissa"))
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))
    _, loss = model(_idx(64), _idx(64, 5))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=0),
        dict(r=2.5),
        dict(alpha=-1),
        dict(alpha=float("nan")),
        dict(dropout=1.0),
        dict(target_modules=("q_proj", "c_attn")),
        dict(target_modules=()),
        dict(target_modules="q_proj"),
        dict(use_rslora="yes"),
        dict(init="pissa_niter_"),
        dict(init="loftq"),
    ],
)
def test_bad_config_raises_one_line(kwargs):
    with pytest.raises(ValueError) as e:
        LoRAConfig(**kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_conversion_is_peft_route(rslora, tmp_path):
    """Our converted export holds what peft's save_pretrained(path_initial_model_for_weight_conversion=...)
    writes: the same tensors and the same r, lora_alpha (rank 2r, scaling kept)."""
    from safetensors.torch import load_file

    path = _base("llama_gqa2", tmp_path)
    cfg = LoRAConfig(r=4, alpha=6, use_rslora=rslora, init="pissa", target_modules=PARTIAL)
    theirs = _peft(path, cfg, "pissa")
    theirs.peft_config["default"].init_lora_weights = True  # peft's documented recipe for the initial copy
    theirs.save_pretrained(str(tmp_path / "init" / "pissa_init"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    ours = apply_lora(_aligned(hf_checkpoint.from_hf(path)), cfg)
    _perturb_B(ours)
    with torch.no_grad():
        for p, q in _pairs(ours, theirs):
            q.copy_(p)
    theirs.save_pretrained(
        str(tmp_path / "peft_out"),
        path_initial_model_for_weight_conversion=str(tmp_path / "init" / "pissa_init"),
    )
    save_peft_adapter(ours, cfg, str(tmp_path / "ours"), path, convert_pissa_to_original_base=True)
    a = load_file(str(tmp_path / "peft_out" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = json.loads((tmp_path / "peft_out" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (ca["r"], ca["lora_alpha"], ca["use_rslora"]) == (cb["r"], cb["lora_alpha"], cb["use_rslora"])


def test_dropout_is_independent_per_projection():
    """Training-mode dropout draws one mask per projection in slice order, as peft's separate modules do."""
    torch.manual_seed(0)
    model = tiny_gpt()
    apply_lora(model, LoRAConfig(r=2, dropout=0.5, init="gaussian", target_modules=("q_proj", "v_proj")))
    _perturb_B(model)
    m = model.h[0].attn.c_attn.train()
    x = torch.randn(2, 3, 16)
    torch.manual_seed(1)
    y = m(x)
    torch.manual_seed(1)
    ref = F.linear(x, m.weight, m.bias)
    parts = list(ref.split(16, -1))
    for i, n in ((0, "q_proj"), (2, "v_proj")):
        parts[i] = parts[i] + m.scaling * F.linear(F.linear(F.dropout(x, 0.5), m.lora_A[n]), m.lora_B[n])
    torch.testing.assert_close(y, torch.cat(parts, -1), atol=1e-6, rtol=0)
    m.eval()
    assert not torch.allclose(m(x), y)


@pytest.mark.gpu
def test_cuda_bf16_base_matches_cpu_fp32():
    """On a GPU: PiSSA factors from a CUDA SVD match the CPU ones, and a bf16 base with fp32 adapters
    gives the fp32 logits within bf16 rounding and fp32 adapter gradients."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY_GPT, "block_size": 32, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 64,
                         **LLAMA_FEATURES})
    cpu = GPT(cfg)
    gpu = GPT(cfg)
    gpu.load_state_dict(cpu.state_dict())
    lcfg = LoRAConfig(r=4, alpha=8, init="pissa")
    apply_lora(cpu, lcfg)
    apply_lora(gpu.cuda(), lcfg)
    for p, q in zip(lora_parameters(cpu), lora_parameters(gpu), strict=True):
        torch.testing.assert_close(
            p.abs(), q.cpu().abs(), atol=1e-4, rtol=1e-3
        )  # singular vectors up to sign
    gpu.to(torch.bfloat16)
    with torch.no_grad():  # keep fp32 masters after the cast
        for _, m in lora_modules(gpu):
            for d in (m.lora_A, m.lora_B):
                for k in list(d):
                    d[k] = torch.nn.Parameter(d[k].float())
    idx = _idx(64).cuda()
    with torch.no_grad():
        ref = cpu(idx.cpu())[0]
        got = gpu(idx)[0].float().cpu()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    _, loss = gpu(idx, _idx(64, 5).cuda())
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_parameters(gpu))
