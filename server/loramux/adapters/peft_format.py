"""Read a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

Adapters are data, never code: the config is parsed with `json`, the weights with the
`safetensors` library, and nothing from transformers/PEFT is imported or executed.
Every check that can be made from metadata (file size, header, dtypes, keys, shapes,
ranks, scales) runs before any tensor is materialised; the values are checked after
(finite, and each ΔW bounded against its base weight). Each refusal is an
AdapterRefused whose message names the adapter and the check that failed, and files
only by their path under the adapter root (`<name>/<file>`): the message reaches
inference callers, who must not learn the server's paths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

from loramux.adapters.naming import is_within
from loramux.adapters.types import FileStamp, LoraAdapter, LoraModule
from loramux.config import AdapterConfig
from loramux.errors import AdapterRefused
from loramux.model.spec import BaseModelSpec

_log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
# PEFT configs nest 3 levels at most (an object of pattern objects, lists); the
# limit keeps deeply nested JSON from exhausting the recursion of the parser and of
# everything that later walks or prints the config.
MAX_JSON_DEPTH = 32
# |lora_alpha / r| (or / √r with rsLoRA) of published adapters is about 0.25 to 64;
# 10^4 leaves room for odd recipes and refuses scales like 1e30 that only overflow
# float32 once folded into B. The ΔW bound below is the finer check.
MAX_SCALE = 1e4
# A trained adapter's update is a correction: ‖s·B·A‖_F is about 0.01-1× the norm of
# the base weight it adds to. 100× leaves two orders of magnitude of headroom, yet a
# module past it would drown the base layer's output (garbage or non-finite logits
# for every row that uses the adapter), which is what corrupt or hostile files do.
MAX_DELTA_TO_BASE_NORM = 100.0
# A 30-layer, 7-target adapter has a ~60 KB header; safetensors itself caps at 100 MB.
MAX_HEADER_BYTES = 8 * 1024 * 1024
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
PEFT_PREFIX = "base_model.model."

# PEFT LoraConfig fields that, when set, change the forward pass or need state we do
# not load; the value says what to tell the operator.
UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector and changes the forward pass",
    "lora_bias": "lora_bias trains a bias on lora_B",
    "target_parameters": "target_parameters puts LoRA on raw parameters (e.g. MoE experts)",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
    "layer_replication": "layer_replication changes the layer stack",
    "use_qalora": "QA-LoRA (use_qalora) pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) gates on tokens",
    "arrow_config": "Arrow routing (arrow_config) mixes adapters per token",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) changes the factor layout",
    "velora_config": "VeLoRA (velora_config) changes the forward pass",
    "monteclora_config": "MonteCLoRA (monteclora_config) samples the factors",
    "kasa_config": "KaSA (kasa_config) changes the forward pass",
}
# These initialisations rewrite the base weights during training, so the adapter only
# fits that modified base; PEFT's save-time conversion resets the field to true.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

# `...q_proj.lora_A.weight`, optionally with PEFT's adapter name: `...lora_A.default.weight`.
_KEY_RE = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$"
)
_QUANTIFIED_GROUP_RE = re.compile(r"\)[*+?{]")


def default_warn(msg: str) -> None:
    """Log an adapter warning (read_adapter's default `warn`)."""
    _log.warning(msg)


def read_adapter(
    directory: Path,
    name: str,
    spec: BaseModelSpec,
    cfg: AdapterConfig,
    warn: Callable[[str], None] = default_warn,
    entry: Path | None = None,
) -> LoraAdapter:
    """Validate and load the PEFT LoRA adapter in `directory` for base model `spec`.

    Returns float32, contiguous, CPU factors per target module with PEFT's scale,
    and a FileStamp of each file read, stat'ed later through `entry` (the path the
    adapter is named by, <root>/<name>; default `directory`).
    Raises AdapterRefused (an InvalidArgument) when any check fails; calls `warn`
    when the base model name differs and cfg.name_mismatch is "warn".
    """
    directory = Path(directory)
    entry = directory if entry is None else Path(entry)
    config_path, weights_path = _locate_files(directory, name)
    raw_config, config_stat = _read_bounded(config_path, MAX_CONFIG_BYTES, name, "config")
    config = _parse_config(raw_config, name)
    _check_features(config, name)
    params = LoraParams.from_config(config, name)
    data, weights_stat = _read_bounded(weights_path, cfg.max_file_bytes, name, "max_file_bytes")
    header = parse_safetensors_header(data, name)
    plan = _plan_modules(header, name, spec, params, cfg.max_rank)
    tensors = _load_tensors(data, header, name)
    modules = {
        module: _make_module(tensors, keys, params, module, name, spec)
        for module, keys in plan.items()
    }
    # Last, so an adapter refused for anything else is never also warned about.
    _check_base_name(config, name, spec, cfg.name_mismatch, warn)
    return LoraAdapter(
        name=name,
        modules=modules,
        content_hash=content_hash(data, params),
        base_model_name=_base_name(config),
        source=directory,
        config=config,
        files=(
            FileStamp.of(entry / CONFIG_FILE, config_stat),
            FileStamp.of(entry / WEIGHTS_FILE, weights_stat),
        ),
    )


def _refuse(name: str, check: str, detail: str) -> AdapterRefused:
    return AdapterRefused(f"adapter {name!r} refused ({check}): {detail}")


# ---------------------------------------------------------------- files


def _locate_files(directory: Path, name: str) -> tuple[Path, Path]:
    """Paths of the config and weights, refusing pickles and missing files."""
    try:
        entries = set(os.listdir(directory))
    except OSError as e:
        raise _refuse(name, "files", f"cannot list {name}/: {e.strerror}") from None
    if WEIGHTS_FILE not in entries:
        pickles = sorted(e for e in entries if e.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise _refuse(
                name,
                "pickle",
                f"found {pickles} and no {WEIGHTS_FILE}: pickle files are refused "
                "because loading them can run arbitrary code; convert to safetensors",
            )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in entries]
    if missing:
        raise _refuse(name, "files", f"{name}/ is missing {', '.join(missing)}")
    return directory / CONFIG_FILE, directory / WEIGHTS_FILE


def _read_bounded(
    path: Path, limit: int, name: str, limit_name: str
) -> tuple[bytes, os.stat_result]:
    """All bytes of a regular file inside its adapter directory, at most `limit`, and
    the stat of the descriptor they were read from, taken before reading.

    The size is checked on the open descriptor before any data is read.
    """
    shown = f"{name}/{path.name}"  # the path under the root: callers never see ours
    real = os.path.realpath(path)
    dir_real = os.path.realpath(path.parent)
    if real == dir_real or not is_within(real, dir_real):
        _log.warning("adapter %r: %s resolves to %s, outside %s", name, path.name, real, dir_real)
        raise _refuse(name, "symlink", f"{shown} resolves outside the adapter directory")
    try:
        # O_NOFOLLOW: the checked real path must not become a symlink under us;
        # O_NONBLOCK: a FIFO planted in the directory must not hang the reader.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise _refuse(name, "files", f"cannot open {shown}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(name, "files", f"{shown} is not a regular file")
        if st.st_size > limit:
            raise _refuse(
                name, "size", f"{shown} is {st.st_size} bytes, over the {limit_name} "
                f"limit of {limit} bytes",
            )
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _refuse(name, "size", f"{shown} grew past {limit} bytes while reading")
    return data, st


# ---------------------------------------------------------------- config


def _parse_config(raw: bytes, name: str) -> dict:
    config = _load_json(raw, name, "config", CONFIG_FILE)
    if not isinstance(config, dict):
        raise _refuse(name, "config", f"{CONFIG_FILE} must hold a JSON object")
    return config


def _load_json(raw: bytes, name: str, check: str, what: str, **kw):
    """json.loads, refusing invalid JSON and nesting deeper than MAX_JSON_DEPTH.

    The C decoder raises RecursionError (cleanly) past the interpreter's limit; a
    shallower but still absurd nesting is measured after parsing.
    """
    too_deep = _refuse(
        name, check, f"{what} is not valid: nesting too deep (over {MAX_JSON_DEPTH} levels)"
    )
    try:
        value = json.loads(raw, **kw)
    except RecursionError:
        raise too_deep from None
    except (UnicodeDecodeError, ValueError) as e:
        raise _refuse(name, check, f"{what} is not valid JSON: {e}") from None
    if _exceeds_depth(value, MAX_JSON_DEPTH):
        raise too_deep
    return value


def _exceeds_depth(value, limit: int) -> bool:
    """Whether arrays/objects nest more than `limit` levels; iterative, so any depth
    the parser accepted is measured without recursion."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        if depth + 1 > limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False


def _check_features(config: dict, name: str) -> None:
    """Refuse every PEFT feature whose math is not ΔW = s·B·A on target linears."""
    if config.get("peft_type") != "LORA":
        raise _refuse(
            name, "peft_type", f"peft_type is {config.get('peft_type')!r}; only 'LORA' is served"
        )
    if config.get("modules_to_save"):
        raise _refuse(
            name, "modules_to_save", f"modules_to_save={config['modules_to_save']} stores "
            "full copies of base modules, which loramux does not serve",
        )
    if config.get("bias", "none") not in ("none", None):
        raise _refuse(
            name, "bias", f"bias={config['bias']!r} trains bias vectors; only 'none' is supported"
        )
    for key, why in UNSUPPORTED_FEATURES.items():
        if config.get(key):
            raise _refuse(name, key, f"{why}; not supported")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise _refuse(
            name, "init_lora_weights", f"init_lora_weights={init!r} changed the base weights "
            "while training; save it with path_initial_model_for_weight_conversion",
        )


@dataclass(frozen=True)
class LoraParams:
    """The config fields that change the math, validated.

    rank_pattern / alpha_pattern keep the file's order: like PEFT, the first key
    that matches a module wins.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]

    @classmethod
    def from_config(cls, config: dict, name: str) -> "LoraParams":
        r = _positive_int(config.get("r"), name, "r")
        alpha = _number(config.get("lora_alpha"), name, "lora_alpha")
        rslora = config.get("use_rslora", False)  # absent before PEFT 0.7: plain scaling
        if not isinstance(rslora, bool):
            raise _refuse(name, "use_rslora", f"use_rslora must be true or false, got {rslora!r}")
        ranks = _pattern(config, "rank_pattern", name, _positive_int)
        alphas = _pattern(config, "alpha_pattern", name, _number)
        return cls(r, alpha, rslora, ranks, alphas)

    def rank_for(self, module: str) -> int:
        return _match_pattern(self.rank_pattern, module, self.r)

    def scale_for(self, module: str) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA (arXiv 2312.03732), per module."""
        r = self.rank_for(module)
        alpha = _match_pattern(self.alpha_pattern, module, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def canonical_json(self) -> str:
        return json.dumps(
            {
                "r": self.r,
                "lora_alpha": self.lora_alpha,
                "use_rslora": self.use_rslora,
                "rank_pattern": [list(p) for p in self.rank_pattern],
                "alpha_pattern": [list(p) for p in self.alpha_pattern],
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def _positive_int(value, name: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(name, field, f"{field} must be a positive integer, got {value!r}")
    return value


def _number(value, name: str, field: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value):
        raise _refuse(name, field, f"{field} must be a finite number, got {value!r}")
    return float(value)


def _pattern(config: dict, field: str, name: str, check) -> tuple:
    raw = config.get(field) or {}
    if not isinstance(raw, dict):
        raise _refuse(name, field, f"{field} must be an object, got {type(raw).__name__}")
    for key in raw:
        _check_pattern_key(key, name, field)
    return tuple((k, check(v, name, f"{field}[{k!r}]")) for k, v in raw.items())


def _check_pattern_key(key: str, name: str, field: str) -> None:
    """PEFT treats pattern keys as regexes; refuse ones that could backtrack for ages.

    Nested quantifiers (a quantified group) and many quantifiers are what make a
    regex exponential or high-degree polynomial; real patterns are module names.
    """
    quantifiers = len(re.findall(r"(?<!\\)[*+?{]", key))
    if len(key) > 256 or _QUANTIFIED_GROUP_RE.search(key) or quantifiers > 2:
        raise _refuse(
            name, field, f"key {key!r} is too complex a regex (over 256 chars, a quantified "
            "group, or more than 2 quantifiers)",
        )
    try:
        re.compile(key)
    except re.error as e:
        raise _refuse(name, field, f"key {key!r} is not a valid regex: {e}") from None


def _match_pattern(pattern: tuple, module: str, default):
    """PEFT's get_pattern_key: a key matches when the name ends with it at a dot."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _base_name(config: dict) -> str | None:
    base = config.get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def _check_base_name(config, name, spec: BaseModelSpec, policy: str, warn) -> None:
    base = _base_name(config)
    if policy == "ignore" or spec.matches_name(base):
        return
    said = f"was trained for base model {base!r}" if base else "does not name its base model"
    msg = (
        f"adapter {name!r} {said} (base_model_name_or_path); the loaded base model "
        f"is {spec.name!r}. Its shapes fit"
    )
    if policy == "refuse":
        raise _refuse(name, "name_mismatch", f"{msg}, but name_mismatch is 'refuse'")
    warn(f"{msg}; serving it anyway (name_mismatch is 'warn')")


# ---------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype, shape and byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def parse_safetensors_header(data: bytes, name: str) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without materialising any tensor.

    Layout: u64 little-endian header length N, N bytes of JSON, then the data.
    """
    if len(data) < 8:
        raise _refuse(name, "header", f"{WEIGHTS_FILE} is shorter than 8 bytes")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER_BYTES or n > len(data) - 8:
        raise _refuse(
            name, "header", f"{WEIGHTS_FILE} declares a {n}-byte header; the file has "
            f"{len(data) - 8} bytes after the length and the limit is {MAX_HEADER_BYTES}",
        )
    # Duplicate keys would make our view differ from the loader's.
    header = _load_json(
        data[8 : 8 + n], name, "header", f"{WEIGHTS_FILE} header", object_pairs_hook=_no_duplicates
    )
    if not isinstance(header, dict):
        raise _refuse(name, "header", f"{WEIGHTS_FILE} header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = len(data) - 8 - n
    return {key: _tensor_info(key, entry, data_len, name) for key, entry in header.items()}


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _tensor_info(key: str, entry, data_len: int, name: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _refuse(name, "header", f"entry {key!r} is not a tensor description")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _refuse(
            name, "dtype", f"tensor {key!r} has dtype {dtype!r}; accepted: {sorted(DTYPE_BYTES)}"
        )
    if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
        raise _refuse(name, "header", f"tensor {key!r} has a malformed shape or data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise _refuse(
            name, "header", f"tensor {key!r} byte range {offsets} does not fit its shape "
            f"{shape} or the {data_len}-byte data section",
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _int_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _load_tensors(data: bytes, header: dict[str, TensorInfo], name: str) -> dict:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # the Rust loader's own checks; any failure is bad data
        raise _refuse(name, "header", f"{WEIGHTS_FILE} failed to load: {e}") from None
    for key, info in header.items():
        if key not in tensors or tuple(tensors[key].shape) != info.shape:
            raise _refuse(name, "header", f"tensor {key!r} differs from its header entry")
    return tensors


# ---------------------------------------------------------------- keys and shapes


@dataclass(frozen=True)
class _ModuleKeys:
    """The file's keys for one target module's A [r, d_in] and B [d_out, r]."""

    a: str
    b: str


def _classify_key(key: str, name: str) -> tuple[str, str]:
    """(module name, "lora_A" | "lora_B") for an accepted key, else a refusal."""
    bare = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
    parts = bare.split(".")
    if "lora_embedding_A" in parts or "lora_embedding_B" in parts or any(
        p in EMBEDDING_MODULES for p in parts
    ):
        raise _refuse(name, "embeddings", f"key {key!r} puts LoRA on embeddings or lm_head")
    if "lora_magnitude_vector" in parts:
        raise _refuse(name, "use_dora", f"key {key!r} is a DoRA magnitude vector")
    if "modules_to_save" in parts or "original_module" in parts:
        raise _refuse(name, "modules_to_save", f"key {key!r} is a modules_to_save copy")
    if parts[-1] == "bias":
        raise _refuse(name, "bias", f"key {key!r} is a bias; only bias='none' is supported")
    m = _KEY_RE.match(bare)
    if m is None:
        raise _refuse(
            name, "keys", f"unexpected key {key!r}; only '<module>.lora_A.weight' and "
            "'<module>.lora_B.weight' are accepted",
        )
    return m["module"], m["kind"]


def _group_keys(header: dict[str, TensorInfo], name: str) -> dict[str, dict[str, str]]:
    groups: dict[str, dict[str, str]] = {}
    for key in header:
        module, kind = _classify_key(key, name)
        slot = groups.setdefault(module, {})
        if kind in slot:
            raise _refuse(name, "keys", f"{module} has two {kind} tensors ({slot[kind]}, {key})")
        slot[kind] = key
    if not groups:
        raise _refuse(name, "keys", f"{WEIGHTS_FILE} holds no LoRA weights")
    return groups


def _plan_modules(header, name, spec: BaseModelSpec, params: LoraParams, max_rank: int):
    """Check every module's keys, shapes and rank against the base model; no data read."""
    plan: dict[str, _ModuleKeys] = {}
    for module, kinds in sorted(_group_keys(header, name).items()):
        if module not in spec.targets:
            raise _refuse(
                name, "modules", f"targets module {module} which the base model does not have"
            )
        for kind in ("lora_A", "lora_B"):
            if kind not in kinds:
                raise _refuse(name, "keys", f"module {module} has no {kind} weight")
        _check_shapes(header[kinds["lora_A"]], header[kinds["lora_B"]], module, name, spec,
                      params, max_rank)
        _check_scale(params, module, name)
        plan[module] = _ModuleKeys(kinds["lora_A"], kinds["lora_B"])
    return plan


def _check_scale(params: LoraParams, module: str, name: str) -> None:
    s = params.scale_for(module)
    if not math.isfinite(s) or abs(s) > MAX_SCALE:
        raise _refuse(
            name, "scale", f"{module} has scale {s:.3g} (lora_alpha / r from the config, or "
            f"alpha_pattern / rank_pattern); the limit is ±{MAX_SCALE:g}",
        )


def _check_shapes(a: TensorInfo, b: TensorInfo, module, name, spec, params, max_rank) -> None:
    t = spec.targets[module]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != t.d_in or b.shape[0] != t.d_out:
        raise _refuse(
            name, "shape", f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not "
            f"fit the base linear (needs lora_A [r, {t.d_in}], lora_B [{t.d_out}, r])",
        )
    r = a.shape[0]
    if b.shape[1] != r:
        raise _refuse(name, "rank", f"{module}: lora_A has rank {r} but lora_B has {b.shape[1]}")
    if not 1 <= r <= max_rank:
        raise _refuse(name, "max_rank", f"{module} has rank {r}; max_rank allows 1..{max_rank}")
    if r != params.rank_for(module):
        raise _refuse(
            name, "rank", f"{module} has rank {r} in the file but rank "
            f"{params.rank_for(module)} in the config (r / rank_pattern)",
        )


def _make_module(tensors, keys: _ModuleKeys, params: LoraParams, module, name,
                 spec: BaseModelSpec) -> LoraModule:
    a = tensors[keys.a].to(device="cpu", dtype=torch.float32).contiguous()  # [r, d_in]
    b = tensors[keys.b].to(device="cpu", dtype=torch.float32).contiguous()  # [d_out, r]
    for key, t in ((keys.a, a), (keys.b, b)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            # Counted in float32: float64 values past its range arrive as Inf.
            raise _refuse(
                name, "finite", f"{module}: tensor {key!r} holds {bad} non-finite "
                f"value(s) (NaN/Inf) of {t.numel()}",
            )
    m = LoraModule(A=a, B=b, scale=params.scale_for(module))
    _check_delta_norm(m, module, name, spec.targets[module].weight_norm)
    return m


def delta_norm(m: LoraModule) -> float:
    """‖s·B·A‖_F from the factors alone: ‖BA‖_F² = Σ (BᵀB)∘(AAᵀ), two [r, r] Gram
    matrices instead of the [d_out, d_in] product. In float64, where squares of
    finite float32 values cannot overflow."""
    a, b = m.A.double(), m.B.double()  # [r, d_in], [d_out, r]
    squared = float(((b.t() @ b) * (a @ a.t())).sum())
    return abs(m.scale) * math.sqrt(max(squared, 0.0))  # rounding can dip below 0


def _check_delta_norm(m: LoraModule, module: str, name: str, base_norm: float | None) -> None:
    """Refuse a ΔW that float32 cannot hold, or one over MAX_DELTA_TO_BASE_NORM times
    its base weight (not checked where the spec has no norm, or a zero weight)."""
    norm = delta_norm(m)
    if norm > torch.finfo(torch.float32).max:
        raise _refuse(
            name, "delta_norm", f"{module}: the update s·B·A has Frobenius norm {norm:.3g}, "
            "past what float32 holds",
        )
    if not base_norm or norm <= MAX_DELTA_TO_BASE_NORM * base_norm:
        return
    raise _refuse(
        name, "delta_norm", f"{module}: the update s·B·A has Frobenius norm {norm:.3g}, "
        f"{norm / base_norm:.3g} times the base weight's {base_norm:.3g}; the limit is "
        f"{MAX_DELTA_TO_BASE_NORM:g} times (trained adapters are about 0.01-1 times)",
    )


def content_hash(data: bytes, params: LoraParams) -> str:
    """sha256 over the safetensors bytes and the config fields that change the math."""
    h = hashlib.sha256(data)
    h.update(b"\0")
    h.update(params.canonical_json().encode())
    return h.hexdigest()
