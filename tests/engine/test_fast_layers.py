"""The fast Llama-family decoder layers (model/fast_layers.py, csrc/layers_cpu.c):
the kernels against torch's formulas, and engines with the fast layers against the
same engine on transformers' forward and against PEFT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loramux.app import build_engine
from loramux.config import AdapterConfig, EngineConfig, ModelConfig
from loramux.engine.sampling import SamplingParams
from loramux.engine.types import GenerationRequest
from loramux.model import fast_layers
from loramux.model.fast_layers import install_fast_layers, set_fast_layers
from tests.conftest import build_tiny_model, make_adapter

PROMPTS = [
    "The quick brown fox",
    "SELECT name FROM users WHERE",
    "def add(a, b):",
    "Héllo wörld — naïve café, 東京 and emoji 🙂 too. The quick brown",
]
ROW_ADAPTERS = [None, "a", "b", "a"]


@pytest.fixture(scope="module")
def kernels():
    k = fast_layers.load_kernels()
    if k is None:
        pytest.skip("no C compiler: the layer kernels cannot be built here")
    return k


# ------------------------------------------------------------------ kernels


def _hf_rmsnorm(x, w, eps):
    """LlamaRMSNorm.forward, float32."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("n,d", [(1, 576), (5, 77), (13, 1), (3, 1000)])
def test_rmsnorm_matches_hf(kernels, n, d):
    g = torch.Generator().manual_seed(n * d)
    x_buf = torch.randn(n, d + 7, generator=g) * 3  # strided rows
    x = x_buf[:, 3 : 3 + d]
    w = torch.randn(d, generator=g)
    out_buf = torch.full((n, d + 5), 123.0)
    out = out_buf[:, :d]
    kernels.rmsnorm(out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0), w.data_ptr(), n, d, 1e-5, 2)
    want = _hf_rmsnorm(x, w, 1e-5)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6 * want.abs().max().item())
    assert (out_buf[:, d:] == 123.0).all()  # nothing written past a row
    # The variance is in float32 with eps added in float32: a tiny-variance row (eps dominates) agrees too.
    z = torch.full((1, d), 1e-4)
    o = torch.empty_like(z)
    kernels.rmsnorm(o.data_ptr(), d, z.data_ptr(), d, w.data_ptr(), 1, d, 1e-2, 1)
    torch.testing.assert_close(o, _hf_rmsnorm(z, w, 1e-2), rtol=2e-6, atol=0)


@pytest.mark.parametrize("n,d", [(1, 64), (4, 33), (300, 96)])  # 300 x 96: the threaded path
def test_add_rmsnorm_matches_hf(kernels, n, d):
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d + 3, generator=g)[:, :d]
    res = torch.randn(n, d + 9, generator=g)[:, 2 : 2 + d]
    w = torch.randn(d, generator=g)
    h_want = x + res  # HF: residual + hidden_states
    out = torch.empty(n, d)
    x_before = x.clone()
    kernels.add_rmsnorm(out.data_ptr(), d, res.data_ptr(), res.stride(0), x.data_ptr(), x.stride(0),
                        w.data_ptr(), n, d, 1e-6, 2)
    assert torch.equal(res, h_want)  # the new residual, written back, exactly the float32 sum
    assert torch.equal(x, x_before)
    want = _hf_rmsnorm(h_want, w, 1e-6)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6 * want.abs().max().item())


@pytest.mark.parametrize("n,hq,hkv,d", [(1, 9, 3, 64), (5, 4, 2, 16), (3, 6, 6, 6), (200, 8, 2, 64)])
def test_rope_matches_hf(kernels, n, hq, hkv, d):
    g = torch.Generator().manual_seed(hq * d + n)
    q_buf = torch.randn(n, hq * d + 8, generator=g)  # row strides past the heads
    k_buf = torch.randn(n, hkv * d + 4, generator=g)
    q, k = q_buf[:, : hq * d].view(n, hq, d), k_buf[:, : hkv * d].view(n, hkv, d)
    theta = torch.rand(n, d, generator=g) * 50
    theta[:, d // 2 :] += 0.3  # the halves of cos/sin need not be equal: each is read
    cos_buf, sin_buf = torch.cat([theta.cos(), torch.zeros(n, 3)], 1), torch.cat([theta.sin(), torch.zeros(n, 5)], 1)
    cos, sin = cos_buf[:, :d], sin_buf[:, :d]
    c, s = cos[:, None], sin[:, None]
    q_want, k_want = q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    q_tail, k_tail = q_buf[:, hq * d :].clone(), k_buf[:, hkv * d :].clone()
    kernels.rope(q.data_ptr(), q_buf.stride(0), hq, k.data_ptr(), k_buf.stride(0), hkv, cos.data_ptr(),
                 cos_buf.stride(0), sin.data_ptr(), sin_buf.stride(0), n, d, 2)
    # The same float32 products and sums as HF's: equal, not just close.
    assert torch.equal(q, q_want) and torch.equal(k, k_want)
    assert torch.equal(q_buf[:, hq * d :], q_tail) and torch.equal(k_buf[:, hkv * d :], k_tail)


@pytest.mark.parametrize("n,m", [(1, 1536), (3, 37), (7, 1), (64, 1536)])
def test_silu_mul_matches_torch(kernels, n, m):
    g = torch.Generator().manual_seed(n * m)
    gate = torch.randn(n, m + 5, generator=g)[:, :m] * 6
    up = torch.randn(n, m + 2, generator=g)[:, 1 : 1 + m]
    want = F.silu(gate) * up
    out = torch.empty(n, m)
    kernels.silu_mul(out.data_ptr(), m, gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), n, m, 2)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    # in place into gate, as the layer calls it
    g2 = gate.clone()
    kernels.silu_mul(g2.data_ptr(), g2.stride(0), g2.data_ptr(), g2.stride(0), up.data_ptr(), up.stride(0), n, m, 1)
    torch.testing.assert_close(g2, want, rtol=1e-6, atol=1e-7)


def test_silu_extremes(kernels):
    x = torch.tensor([-1000.0, -120.0, -88.0, -87.5, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.0, 90.0, 1000.0,
                      float("inf"), float("-inf")])
    up = torch.ones_like(x)
    out = torch.empty_like(x)
    kernels.silu_mul(out.data_ptr(), 0, x.data_ptr(), 0, up.data_ptr(), 0, 1, x.numel(), 1)
    torch.testing.assert_close(out, F.silu(x) * up, rtol=1e-6, atol=1e-30, equal_nan=True)
    nan = torch.tensor([float("nan")] * 3)
    kernels.silu_mul(out.data_ptr(), 0, nan.data_ptr(), 0, up.data_ptr(), 0, 1, 3, 1)
    assert out[:3].isnan().all()


# ------------------------------------------------------------------ engines


def _engine(model_dir, adapter_root):
    return build_engine(EngineConfig(
        model=ModelConfig(path=model_dir), adapters=AdapterConfig(roots=[adapter_root], max_rank=16),
    ))


def _fast_count(engine):
    return sum(isinstance(m, fast_layers._FastDecoderLayer) for m in engine.model.modules())


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family_setup(request, tmp_path_factory, kernels):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"fast-{family}")
    model_dir = build_tiny_model(family, tmp / "model")
    root = tmp / "adapters"
    make_adapter(model_dir, root / "a", r=8, alpha=16, seed=11)
    make_adapter(model_dir, root / "b", r=4, alpha=8, rslora=True, seed=12)
    fast = _engine(model_dir, root)
    slow = _engine(model_dir, root)
    assert set_fast_layers(slow.model, False) == 3  # two layers and the final norm
    return family, model_dir, root, fast, slow


@pytest.fixture
def count_fast(monkeypatch):
    """How many times the fast layer forward ran (and returned a result)."""
    calls = []
    inner = fast_layers._FastDecoderLayer._fast_forward

    def counting(self, *args):
        out = inner(self, *args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(fast_layers._FastDecoderLayer, "_fast_forward", counting)
    return calls


def _requests(sampling=None):
    kw = {} if sampling is None else {"sampling": sampling}
    return [GenerationRequest(prompt=p, adapter=a, **kw) for p, a in zip(PROMPTS, ROW_ADAPTERS)]


def test_layers_swapped_and_state_dict_unchanged(family_setup):
    family, model_dir, root, fast, _ = family_setup
    assert _fast_count(fast) == 2
    assert type(fast.model.model.norm).__name__.startswith("Fast")
    # A second engine's model loaded fresh has the same state_dict names as a swapped one.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    keys_before = list(plain.state_dict().keys())
    hf_layer, hf_norm = type(plain.model.layers[0]), type(plain.model.norm)
    from loramux.model import attention

    attention.install(plain)
    assert install_fast_layers(plain) == 2
    assert list(plain.state_dict().keys()) == keys_before
    assert type(plain.model.layers[0]) is not hf_layer and isinstance(plain.model.layers[0], hf_layer)
    assert type(plain.model.norm) is not hf_norm and isinstance(plain.model.norm, hf_norm)
    assert install_fast_layers(plain) == 0  # already swapped: the classes are no longer the HF ones
    # The swapped classes are importable by name: a swapped model pickles (and deep-copies).
    import pickle

    again = pickle.loads(pickle.dumps(plain))
    assert type(again.model.layers[1]) is type(plain.model.layers[1])
    assert getattr(fast_layers, type(plain.model.layers[1]).__name__) is type(plain.model.layers[1])


def test_prompt_logits_fast_equal_hf_path(family_setup, count_fast):
    _, _, _, fast, slow = family_setup
    got = fast.prompt_logits(_requests())
    assert count_fast and all(count_fast)  # the fast forward really ran, every layer
    n_fast = len(count_fast)
    want = slow.prompt_logits(_requests())
    assert len(count_fast) == n_fast  # and the disabled engine never took it
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_generate_fast_equal_hf_path(family_setup, count_fast):
    _, _, _, fast, slow = family_setup
    params = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    got = fast.generate(_requests(params))
    assert count_fast and all(count_fast)
    want = slow.generate(_requests(params))
    for a, b in zip(got, want):
        assert a.token_ids == b.token_ids and len(a.token_ids) == 10


def test_fast_layers_match_peft(family_setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, model_dir, root, fast, _ = family_setup
    got = fast.prompt_logits(_requests())
    peft = {name: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), root / name).eval()
            for name in ("a", "b")}
    tok = fast.tokenizer
    for (p, a), logits in zip(zip(PROMPTS, ROW_ADAPTERS), got):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if a is None:
                with peft["a"].disable_adapter():
                    want = peft["a"](input_ids=ids).logits[0]
            else:
                want = peft[a](input_ids=ids).logits[0]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
    # the adapters move the logits far past the tolerance (else this proves nothing)
    with torch.no_grad():
        ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
        with peft["a"].disable_adapter():
            base = peft["a"](input_ids=ids).logits[0]
        assert (peft["a"](input_ids=ids).logits[0] - base).abs().max() > 1e-2


def test_gemma_stays_on_hf(tmp_path, kernels):
    model_dir = build_tiny_model("gemma", tmp_path / "gemma")
    make_adapter(model_dir, tmp_path / "ad" / "a", r=4, alpha=8, seed=5)
    engine = _engine(model_dir, tmp_path / "ad")
    assert _fast_count(engine) == 0
    assert install_fast_layers(engine.model) == 0
    assert engine.prompt_logits([GenerationRequest(prompt=PROMPTS[0], adapter="a")])[0].isfinite().all()


def test_not_swapped_without_paged_attention_or_float32(family_setup):
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _, _ = family_setup
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    assert install_fast_layers(plain) == 0  # sdpa, not the paged attention: the fast path would bypass it
    from loramux.model import attention

    half = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    attention.install(half)
    assert install_fast_layers(half) == 0


def test_fast_forward_outside_engine_is_hf(family_setup):
    """Without a step (a plain forward), the swapped model is transformers' model."""
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _, _ = family_setup
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from loramux.model import attention

    attention.install(m)
    assert install_fast_layers(m) == 2
    ids = torch.tensor([[5, 17, 33, 2, 90, 101]])
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_disagreeing_family_is_not_swapped(family_setup, monkeypatch):
    """The install-time check runs the layer both ways: a fast forward that computes
    something else leaves the family on the HF forward."""
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _, _ = family_setup
    inner = fast_layers._FastDecoderLayer._fast_forward
    monkeypatch.setattr(fast_layers._FastDecoderLayer, "_fast_forward",
                        lambda self, x, pe, step: inner(self, x, pe, step) * 1.01)
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    from loramux.model import attention

    attention.install(m)
    assert install_fast_layers(m) == 0
    assert not any(isinstance(x, fast_layers._FastDecoderLayer) for x in m.modules())
