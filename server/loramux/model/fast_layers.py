"""Llama-family decoder layers without transformers' per-op overhead on CPU.

A decode step of a small model spends milliseconds in the torch ops around the
linears: an RMSNorm is six ops, RoPE a dozen (rotate_half, cat, mul, add), the
MLP's SiLU and product two more, plus the residual adds, the views and the module
calls in between. `install_fast_layers` swaps the class of every decoder layer of
an exactly known family (Llama, Mistral, Qwen2; float32 weights on CPU) to a
subclass whose forward, during engine steps (the `loramux_step` keyword present,
see model/attention.py), runs the same math as one C call per small op
(csrc/layers_cpu.c):

    rmsnorm(x) → q/k/v projections → RoPE on q and k in place → paged attention
    → o projection → (x + attn) and rmsnorm in one call → gate/up projections
    → silu(gate) * up in place → down projection → + residual

The projections stay the layer's own modules (LoraLinear: each row's adapter
delta), called as modules; attention is the step's own op, as HF's path calls it
through the registered attention function. Any other call (no step, autograd, a
cache, another dtype or device) runs the original HF forward, so does every
layer after `set_fast_layers(model, False)`. Module tree, parameters and their
names are unchanged: only `__class__` differs (a subclass of the HF class, so
isinstance checks and output-capturing hooks still see an HF layer). The model's
final norm is swapped alike (the C RMSNorm whenever autograd is off). Layers are
swapped only with the paged attention installed (the fast path calls the step's
op itself, as paged_attention_forward does, softcap-free, scale from
`self_attn.scaling`) and without a sliding window.

Results equal HF's to float32 rounding: RoPE and the residual adds are the same
float32 operations, RMSNorm differs only in the order of its sum, SiLU in its exp
(~1 ulp). Before swapping a family's layers, the first one is run both ways on
random input and must agree; else that family keeps the HF forward (so a future
transformers whose layer math changed is left alone, not silently diverged).
"""

from __future__ import annotations

import importlib
import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from loramux.model.attention import ATTN_IMPLEMENTATION, PagedStep
from loramux.model.lora_layers import LoraLinear

log = logging.getLogger(__name__)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class _Kernels:
    """The bound C entries of csrc/layers_cpu.c."""

    def __init__(self, lib):
        self.rmsnorm = lib.lmx_rmsnorm_f32
        self.add_rmsnorm = lib.lmx_add_rmsnorm_f32
        self.rope = lib.lmx_rope_f32
        self.silu_mul = lib.lmx_silu_mul_f32


def load_kernels() -> _Kernels | None:
    """The layer kernels, or None where they cannot be built here (logged by native)."""
    from loramux_kernels import native

    lib = native.load("layers_cpu")
    return None if lib is None else _Kernels(lib)


class _FastDecoderLayer:
    """The fast forward, mixed in before the family's HF decoder layer class."""

    fast = True  # per instance: set_fast_layers turns it off
    _kernels: _Kernels | None = None  # per class, set at install (ctypes entries do not pickle)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        step = kwargs.get("loramux_step")
        if (
            step is not None and self.fast and self._kernels is not None and past_key_values is None
            and position_embeddings is not None
            and hidden_states.dtype is torch.float32 and hidden_states.is_cpu and hidden_states.dim() == 3
            and hidden_states.shape[0] == 1 and hidden_states.is_contiguous() and not torch.is_grad_enabled()
        ):  # (the paged attention implementation is checked at install: a config read costs 1.5 us)
            out = self._fast_forward(hidden_states, position_embeddings, step)
            if out is not None:
                return out
        return super().forward(
            hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
            **kwargs,
        )

    def _fast_forward(self, x: torch.Tensor, position_embeddings, step: PagedStep) -> torch.Tensor | None:
        """x: [1, N, d] contiguous float32 → the layer's output [1, N, d]; x is not
        written. None (before any work) for a cos/sin it does not take."""
        kern = self._kernels
        mods = self._modules
        attn, mlp = mods["self_attn"], mods["mlp"]
        am, mm = attn._modules, mlp._modules
        ln1, ln2 = mods["input_layernorm"], mods["post_attention_layernorm"]
        _, n, d = x.shape
        head_dim = attn.head_dim
        cos, sin = position_embeddings  # [1, N, D] each
        if not (
            cos.dtype is torch.float32 and sin.dtype is torch.float32 and cos.shape == sin.shape == (1, n, head_dim)
            and cos.is_contiguous() and sin.is_contiguous()
        ):
            return None
        threads = torch.get_num_threads()
        x_ptr = x.data_ptr()

        normed = torch.empty_like(x)  # input of q/k/v, then (dead by then) of gate/up
        normed_ptr = normed.data_ptr()
        kern.rmsnorm(normed_ptr, d, x_ptr, d, ln1._parameters["weight"].data_ptr(), n, d,
                     ln1.variance_epsilon, threads)

        q = am["q_proj"](normed).contiguous()  # [1, N, Hq * D]
        k = am["k_proj"](normed).contiguous()  # [1, N, Hkv * D]
        v = am["v_proj"](normed).contiguous()
        hq, hkv = q.shape[-1] // head_dim, k.shape[-1] // head_dim
        kern.rope(q.data_ptr(), hq * head_dim, hq, k.data_ptr(), hkv * head_dim, hkv, cos.data_ptr(), head_dim,
                  sin.data_ptr(), head_dim, n, head_dim, threads)  # HF's apply_rotary_pos_emb, in place
        layer = attn.layer_idx
        kv = step.kv
        # [1, H, N, D] views of the [1, N, H * D] rows, as HF's view(...).transpose(1, 2)
        # (one as_strided is half the cost of the two)
        q_row, kv_row = hq * head_dim, hkv * head_dim
        o = step.attend(
            q.as_strided((1, hq, n, head_dim), (n * q_row, head_dim, q_row, 1)),
            k.as_strided((1, hkv, n, head_dim), (n * kv_row, head_dim, kv_row, 1)),
            v.as_strided((1, hkv, n, head_dim), (n * kv_row, head_dim, kv_row, 1)),
            kv.keys[layer], kv.values[layer], step.plan, attn.scaling, None,
        )  # [1, N, Hq, D]
        h = am["o_proj"](o.reshape(1, n, hq * head_dim).contiguous()).contiguous()  # [1, N, d], ours to write

        # h = x + attention (the new residual, in h's buffer); normed = rmsnorm(h)
        kern.add_rmsnorm(normed_ptr, d, h.data_ptr(), d, x_ptr, d, ln2._parameters["weight"].data_ptr(), n, d,
                         ln2.variance_epsilon, threads)
        gate = mm["gate_proj"](normed).contiguous()  # [1, N, I]
        up = mm["up_proj"](normed).contiguous()
        inter = gate.shape[-1]
        gate_ptr = gate.data_ptr()
        kern.silu_mul(gate_ptr, inter, gate_ptr, inter, up.data_ptr(), inter, n, inter, threads)
        out = mm["down_proj"](gate)
        out += h  # h + mlp: the same float32 sum as HF's residual + hidden_states
        return out


class _FastRMSNorm:
    """An RMSNorm (the model's final norm) through the C kernel when it can."""

    fast = True
    _kernels: _Kernels | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        w = self._parameters["weight"]
        if (
            self.fast and self._kernels is not None and hidden_states.dtype is torch.float32 and hidden_states.is_cpu
            and hidden_states.is_contiguous() and not torch.is_grad_enabled()
            and hidden_states.dim() >= 1 and hidden_states.shape[-1] == w.shape[0] > 0
        ):
            d = w.shape[0]
            out = torch.empty_like(hidden_states)
            self._kernels.rmsnorm(out.data_ptr(), d, hidden_states.data_ptr(), d, w.data_ptr(),
                                  hidden_states.numel() // d, d, self.variance_epsilon, torch.get_num_threads())
            return out
        return super().forward(hidden_states)


_FAMILIES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2"}  # class prefix → transformers module


def _modeling(prefix: str):
    mod = _FAMILIES[prefix]
    return importlib.import_module(f"transformers.models.{mod}.modeling_{mod}")


def _families() -> dict[type, SimpleNamespace]:
    """decoder layer class → the exact classes of its parts (source read in
    transformers 5.23: pre-norm RMSNorm, q/k/v/o attention with RoPE from the model's
    rotary module, residual, post-attention RMSNorm, gate/up/down SwiGLU, residual)."""
    out = {}
    for prefix in _FAMILIES:
        mod = _modeling(prefix)
        out[getattr(mod, f"{prefix}DecoderLayer")] = SimpleNamespace(
            attention=getattr(mod, f"{prefix}Attention"),
            mlp=getattr(mod, f"{prefix}MLP"),
            norm=getattr(mod, f"{prefix}RMSNorm"),
            model=getattr(mod, f"{prefix}Model"),
        )
    return out


def _fast_class(base: type, mixin: type) -> type:
    """Fast<Base>, made once and kept as this module's attribute (so a swapped model pickles)."""
    name = f"Fast{base.__name__}"
    cls = globals().get(name)
    if cls is None:
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    """FastLlamaDecoderLayer, FastQwen2RMSNorm, ...: made on first use (unpickling in a
    fresh process looks them up here)."""
    for prefix in _FAMILIES:
        for part, mixin in (("DecoderLayer", _FastDecoderLayer), ("RMSNorm", _FastRMSNorm)):
            if name == f"Fast{prefix}{part}":
                return _fast_class(getattr(_modeling(prefix), f"{prefix}{part}"), mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _float32_cpu(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return all(t.dtype is torch.float32 and t.device.type == "cpu" for t in tensors)


def _why_not(layer: nn.Module, fam: SimpleNamespace) -> str | None:
    """Why this layer cannot take the fast forward (None: it can)."""
    from transformers.activations import SiLUActivation

    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(attn) is not fam.attention or type(mlp) is not fam.mlp:
        return "attention or MLP of another class"
    if not (type(layer.input_layernorm) is type(layer.post_attention_layernorm) is fam.norm):
        return "norms of another class"
    if type(mlp.act_fn) not in (SiLUActivation, nn.SiLU):
        return f"activation {type(mlp.act_fn).__name__}"
    for parent, names in ((attn, _PROJECTIONS), (mlp, _MLP)):
        for name in names:
            proj = getattr(parent, name, None)
            plain = type(proj) is nn.Linear or (type(proj) is LoraLinear and type(proj.base) is nn.Linear)
            if not plain:
                return f"{name} is {type(proj).__name__}"
    if not _float32_cpu(layer):
        return "weights not float32 on CPU"
    cfg = attn.config
    if cfg._attn_implementation != ATTN_IMPLEMENTATION:
        return f"attention implementation {cfg._attn_implementation!r}"
    # Qwen2 keeps its layer's window on the attention module, Mistral reads the
    # config's. The paged attention attends to every key, so does the HF path through
    # it today; a windowed layer stays on HF so it keeps whatever that path does.
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    if window is not None:
        return "sliding-window attention"
    d, hq, hkv = attn.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes_ok = (
        d % 2 == 0 and hq % hkv == 0 and attn.q_proj.out_features == hq * d
        and attn.k_proj.out_features == attn.v_proj.out_features == hkv * d
        and attn.o_proj.in_features == hq * d and mlp.down_proj.in_features == mlp.gate_proj.out_features
    )
    return None if shapes_ok else "projection shapes"


class _CheckAttend:
    """Causal attention over the step's own tokens: the stand-in for the paged op
    when a layer is run both ways at install."""

    def __call__(self, q, key, value, k_pool, v_pool, plan, scale, softcap):
        out = F.scaled_dot_product_attention(q, key, value, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()


def _agrees(layer: nn.Module) -> bool:
    """Run `layer` (already swapped) the HF way and the fast way on random input;
    do they agree to float32 rounding?"""
    g = torch.Generator().manual_seed(0)
    attn = layer.self_attn
    d, hd = layer.input_layernorm.weight.shape[0], attn.head_dim
    n = 3
    x = torch.randn(1, n, d, generator=g)
    theta = torch.rand(1, n, hd, generator=g) * 6.0
    cos, sin = theta.cos(), theta.sin()
    idx = attn.layer_idx
    step = PagedStep(SimpleNamespace(keys={idx: None}, values={idx: None}), None, _CheckAttend())
    kw = dict(position_embeddings=(cos, sin), loramux_step=step)
    with torch.inference_mode():
        layer.fast = False
        want = layer(x, **kw)
        layer.fast = True
        got = layer._fast_forward(x, (cos, sin), step)
    tol = 1e-4 * max(1.0, want.abs().max().item())
    return got is not None and got.shape == want.shape and bool(((got - want).abs().max() <= tol).item())


def _norm_agrees(norm: nn.Module) -> bool:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, norm.weight.shape[0], generator=g)
    with torch.inference_mode():
        norm.fast = False
        want = norm(x)
        norm.fast = True
        got = norm(x)
    return bool(((got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())).item())


def install_fast_layers(model: nn.Module, kernels: _Kernels | None = None) -> int:
    """Swap every decoder layer of a known family (and the model's final norm) to
    the fast forward; the number of layers swapped (0: nothing to do here: another
    family, other dtypes or devices, no C compiler, or not the paged attention)."""
    families = _families()
    eligible, skipped = [], {}
    for module in model.modules():
        fam = families.get(type(module))
        if fam is None:
            continue
        why = _why_not(module, fam)
        if why is None:
            eligible.append(module)
        else:
            skipped[why] = skipped.get(why, 0) + 1
    if skipped:
        log.info("fast decoder layers: %s", "; ".join(f"{c} kept on HF ({why})" for why, c in skipped.items()))
    if not eligible:
        return 0
    if kernels is None:
        kernels = load_kernels()  # built only where some layer can use it
    if kernels is None:
        return 0
    swapped = 0
    checked: dict[type, bool] = {}
    for module in eligible:
        base = type(module)
        fast_cls = _fast_class(base, _FastDecoderLayer)
        fast_cls._kernels = kernels
        module.__class__ = fast_cls
        module.fast = True
        if base not in checked:
            checked[base] = _agrees(module)
            if not checked[base]:
                log.warning("fast %s disagrees with transformers' forward; keeping the HF layers", base.__name__)
        if not checked[base]:
            module.__class__ = base
            del module.fast
            continue
        swapped += 1
    norms = 0
    for module in model.modules():
        fam = next((f for f in families.values() if type(module) is f.model), None)
        norm = getattr(module, "norm", None) if fam is not None else None
        if swapped and norm is not None and type(norm) is fam.norm and _float32_cpu(norm):
            base = type(norm)
            norm_cls = _fast_class(base, _FastRMSNorm)
            norm_cls._kernels = kernels
            norm.__class__ = norm_cls
            if _norm_agrees(norm):
                norms += 1
            else:
                norm.__class__ = base
                del norm.fast
    log.info("fast decoder layers: %d swapped, %d final norm(s)", swapped, norms)
    return swapped


def set_fast_layers(model: nn.Module, enabled: bool) -> int:
    """Turn the fast forward of `model`'s swapped layers and norm on or off (off:
    exactly the HF forward); how many modules it touched."""
    count = 0
    for module in model.modules():
        if isinstance(module, (_FastDecoderLayer, _FastRMSNorm)):
            module.fast = enabled
            count += 1
    return count
