"""Core ML weight compression with coremltools.optimize.coreml: k-means palettization or linear
quantization, with per-op overrides for mixed precision.

coremltools refuses to compress a multifunction package, so each function's package is compressed
with the same plan before they are assembled; the k-means (kmeans_palette, given to coremltools as
its custom LUT function) is deterministic, so the functions' compressed weights are bit-identical
and still deduplicate into one copy. A memo keyed by the weight bytes makes the second and third
function free.

Only model parameters are compressed (op_name_configs names every const): rotary tables and
constant-folded masks stay float16. coremltools skips, with only a log warning, tensors of
weight_threshold elements or fewer and tensors whose channels do not divide into the group or
block; `uncompressed()` lists every parameter left in float16 and why, from the compressed program.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass, field
from typing import Any

PALETTIZE_NBITS = (1, 2, 3, 4, 6, 8)
COMBINATIONS = ("palettize: nbits 1|2|3|4|6|8, granularity per_tensor (default) or per_grouped_channel with group_size "
                "(default 16); linear: dtype int8|int4, granularity per_tensor, per_channel (default) or per_block "
                "with block_size (default 32)")
WEIGHT_THRESHOLD = 0  # every matrix is compressed, however small (coremltools' default skips <= 2048 elements);
# vectors (norm weights, biases) are never given a config, so they stay float16


class InvalidQuantization(ValueError):
    """A combination coremltools does not offer; .field names the request field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{message}; the combinations are: {COMBINATIONS}")
        self.field = field_name


@dataclass(frozen=True)
class Scheme:
    """One compression setting: what OpPalettizerConfig / OpLinearQuantizerConfig receive."""

    mode: str  # palettize | linear
    nbits: int | None = None
    granularity: str = "per_tensor"
    group_size: int | None = None
    dtype: str | None = None
    block_size: int | None = None

    def label(self) -> str:
        if self.mode == "palettize":
            group = f"-g{self.group_size}" if self.granularity == "per_grouped_channel" else ""
            return f"palettize{self.nbits}{group}"
        block = f"-b{self.block_size}" if self.granularity == "per_block" else f"-{self.granularity}"
        return f"{self.dtype}{block}"


@dataclass(frozen=True)
class Override:
    op_type: str | None
    op_name: str | None  # an fnmatch pattern over the parameter name (model.layers.*.mlp.*) or the const name
    scheme: Scheme | None  # None: left uncompressed (skip)


@dataclass(frozen=True)
class Plan:
    scheme: Scheme
    overrides: tuple[Override, ...] = field(default=())

    def label(self) -> str:
        return self.scheme.label() + ("-mixed" if self.overrides else "")


def parse(request: dict[str, Any], field_name: str = "params.quantization") -> Plan:
    """The request's quantization object, checked; raises InvalidQuantization naming the field."""
    scheme = _scheme(request, field_name, None)
    overrides = []
    for index, item in enumerate(request.get("overrides") or []):
        where = f"{field_name}.overrides[{index}]"
        if bool(item.get("op_type")) == bool(item.get("op_name")):
            raise InvalidQuantization(where, "an override names exactly one of op_type or op_name")
        if item.get("skip"):
            settings = [k for k in ("mode", "nbits", "granularity", "group_size", "dtype", "block_size") if item.get(k) is not None]
            if settings:
                raise InvalidQuantization(f"{where}.{settings[0]}", "skip: true leaves the ops uncompressed; give no settings")
            overrides.append(Override(item.get("op_type"), item.get("op_name"), None))
            continue
        overrides.append(Override(item.get("op_type"), item.get("op_name"), _scheme(item, where, scheme)))
    return Plan(scheme, tuple(overrides))


def _scheme(item: dict[str, Any], where: str, base: Scheme | None) -> Scheme:
    mode = item.get("mode") or (base.mode if base else None)
    if mode not in ("palettize", "linear"):
        raise InvalidQuantization(f"{where}.mode", "mode is palettize or linear")
    inherit = base if base is not None and base.mode == mode else None
    granularity = item.get("granularity") or (inherit.granularity if inherit else None)
    if mode == "palettize":
        if granularity not in (None, "per_tensor", "per_grouped_channel"):
            raise InvalidQuantization(f"{where}.granularity", f"palettize has no granularity {granularity}")
        for name in ("dtype", "block_size"):
            if item.get(name) is not None:
                raise InvalidQuantization(f"{where}.{name}", f"{name} belongs to mode linear, not palettize")
        nbits = item.get("nbits") if item.get("nbits") is not None else (inherit.nbits if inherit else None)
        if nbits not in PALETTIZE_NBITS:
            raise InvalidQuantization(f"{where}.nbits", f"palettize needs nbits in {list(PALETTIZE_NBITS)} (got {nbits})")
        granularity = granularity or "per_tensor"
        if granularity not in ("per_tensor", "per_grouped_channel"):
            raise InvalidQuantization(f"{where}.granularity", f"palettize has no granularity {granularity}")
        group = item.get("group_size")
        if granularity == "per_tensor" and group is not None:
            raise InvalidQuantization(f"{where}.group_size", "group_size needs granularity per_grouped_channel")
        if granularity == "per_grouped_channel":
            group = group or (inherit.group_size if inherit and inherit.group_size else 16)
            if group < 1:
                raise InvalidQuantization(f"{where}.group_size", "group_size must be positive")
        return Scheme("palettize", nbits=nbits, granularity=granularity, group_size=group)
    if granularity not in (None, "per_tensor", "per_channel", "per_block"):
        raise InvalidQuantization(f"{where}.granularity", f"linear has no granularity {granularity}")
    for name in ("nbits", "group_size"):
        if item.get(name) is not None:
            raise InvalidQuantization(f"{where}.{name}", f"{name} belongs to mode palettize, not linear")
    dtype = item.get("dtype") or (inherit.dtype if inherit else None)
    if dtype not in ("int8", "int4"):
        raise InvalidQuantization(f"{where}.dtype", f"linear needs dtype int8 or int4 (got {dtype})")
    granularity = granularity or "per_channel"
    if granularity not in ("per_tensor", "per_channel", "per_block"):
        raise InvalidQuantization(f"{where}.granularity", f"linear has no granularity {granularity}")
    block = item.get("block_size")
    if granularity != "per_block" and block is not None:
        raise InvalidQuantization(f"{where}.block_size", "block_size needs granularity per_block")
    if granularity == "per_block":
        block = block or (inherit.block_size if inherit and inherit.block_size else 32)
        if block < 1:
            raise InvalidQuantization(f"{where}.block_size", "block_size must be positive")
    return Scheme("linear", granularity=granularity, dtype=dtype, block_size=block)


# --------------------------------------------------------------------------------------------
# Applying a plan to one function's model


class KMeansMemo:
    """Palettes by k-means, remembered by the weight bytes: the same weight in the next function
    gets the same palette (bit-identical, so the package stores it once) without clustering again."""

    def __init__(self) -> None:
        self.memo: dict[tuple[str, int], tuple[Any, Any]] = {}

    def function(self, nbits: int) -> Any:
        def lut_function(weight: Any) -> tuple[Any, Any]:
            key = (hashlib.sha1(weight.tobytes() + str(weight.shape).encode()).hexdigest(), nbits)
            if key not in self.memo:
                self.memo[key] = kmeans_palette(weight, nbits)
            return self.memo[key]

        return lut_function


def _merge_zeros(values: Any, counts: Any, inverse: Any) -> tuple[Any, Any, Any]:
    """+0.0 and -0.0 are two bit patterns but one value: one point for the clustering."""
    import numpy as np

    zeros = np.flatnonzero(values == 0)
    if len(zeros) < 2:
        return values, counts, inverse
    keep = zeros[0]
    counts = counts.copy()
    counts[keep] = counts[zeros].sum()
    drop = zeros[1:]
    remap = np.arange(len(values))
    remap[drop] = keep
    mask = np.ones(len(values), dtype=bool)
    mask[drop] = False
    compact = np.cumsum(mask) - 1
    return values[mask], counts[mask], compact[remap[inverse]]


def kmeans_palette(weight: Any, nbits: int, iterations: int = 300) -> tuple[Any, Any]:
    """(lut [2**nbits] in the weight's dtype, uint8 indices [weight.size]) by weighted 1-D k-means.

    coremltools clusters with scikit-learn's KMeans over every weight (its fast path needs the
    optional kmeans1d): 20-30 s for one 49152 x 576 embedding at 8 bits, minutes per model. In
    one dimension Lloyd's algorithm is exact and cheap on the sorted distinct float16 values
    weighted by their counts (at most 65,536 points): assignment is a binary search between
    neighbouring centroids. Started from the weighted quantiles, iterated to convergence:
    deterministic, and the same objective coremltools minimises."""
    import numpy as np

    flat = weight.reshape(-1)
    if flat.dtype == np.float16:  # distinct values by counting bit patterns: no sort of millions of weights
        bits = flat.view(np.uint16)
        present = np.flatnonzero(np.bincount(bits, minlength=1 << 16))
        values = present.astype(np.uint16).view(np.float16)
        order = np.argsort(values, kind="stable")
        values, present = values[order], present[order]
        keep = ~np.isnan(values)
        values, present = values[keep], present[keep]
        slot = np.zeros(1 << 16, dtype=np.int64)
        slot[present] = np.arange(len(present))
        inverse = slot[bits]
        counts = np.bincount(inverse, minlength=len(values))
        values, counts, inverse = _merge_zeros(values, counts, inverse)
    else:
        values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    size = 1 << nbits
    lut = np.zeros(size, dtype=np.float64)
    if len(values) <= size:
        lut[: len(values)] = values
        return lut.astype(weight.dtype), inverse.reshape(-1).astype(np.uint8)
    points, mass = values.astype(np.float64), counts.astype(np.float64)
    cumulative = np.cumsum(mass)
    starts = (np.interp((np.arange(size) + 0.5) / size * cumulative[-1], cumulative - mass / 2, points),  # quantiles
              np.linspace(points[0], points[-1], size))  # even spacing: keeps the tails
    best = None
    for centers in starts:  # two starts, the lower error wins
        centers, error = _lloyd(points, mass, centers, iterations)
        if best is None or error < best[1]:
            best = (centers, error)
    centers = best[0]
    labels = np.searchsorted((centers[1:] + centers[:-1]) / 2, points)
    return centers.astype(weight.dtype), labels[inverse.reshape(-1)].astype(np.uint8)


def _lloyd(points: Any, mass: Any, centers: Any, iterations: int) -> tuple[Any, float]:
    """Weighted Lloyd iterations on sorted 1-D points; (centroids, weighted squared error)."""
    import numpy as np

    size = len(centers)
    tolerance = 1e-9 * (points[-1] - points[0])
    for _ in range(iterations):
        labels = np.searchsorted((centers[1:] + centers[:-1]) / 2, points)
        total = np.bincount(labels, weights=mass, minlength=size)
        moved = np.where(total > 0, np.bincount(labels, weights=points * mass, minlength=size) / np.maximum(total, 1e-300),
                         centers)
        done = np.abs(moved - centers).max() <= tolerance
        centers = moved
        if done:
            break
    labels = np.searchsorted((centers[1:] + centers[:-1]) / 2, points)
    return centers, float(np.sum(mass * (points - centers[labels]) ** 2))


def scheme_for(plan: Plan, const_name: str, parameter: str | None, consumers: set[str]) -> Scheme | None:
    """The last matching override wins; then the global scheme."""
    chosen: Scheme | None = plan.scheme
    for override in plan.overrides:
        if override.op_type and override.op_type in consumers:
            chosen = override.scheme
        elif override.op_name and (fnmatch.fnmatchcase(const_name, override.op_name)
                                   or (parameter is not None and fnmatch.fnmatchcase(parameter, override.op_name))):
            chosen = override.scheme
    return chosen


def choose(consts: dict[str, dict[str, Any]], plan: Plan, parameters: dict[str, str]) -> dict[str, Scheme | None]:
    """The scheme of every const: None for what stays float16 (not a parameter, a vector, a skip).
    A matrix whose channels do not divide into the group (block) falls back to per-tensor
    palettization (per-channel quantization) at the same bits, so nothing large is left behind."""
    out: dict[str, Scheme | None] = {}
    for name, info in consts.items():
        scheme = scheme_for(plan, name, parameters.get(name), info["consumers"]) if name in parameters else None
        out[name] = None if scheme is None or len(info["shape"]) < 2 else fallback(scheme, info["shape"])
    return out


def fallback(scheme: Scheme, shape: tuple[int, ...]) -> Scheme:
    if scheme.granularity == "per_grouped_channel" and shape[0] % scheme.group_size:
        return Scheme("palettize", nbits=scheme.nbits)
    if scheme.granularity == "per_block" and shape[-1] % scheme.block_size:
        return Scheme("linear", granularity="per_channel", dtype=scheme.dtype)
    return scheme


def fallbacks(consts: dict[str, dict[str, Any]], plan: Plan, parameters: dict[str, str]) -> list[dict[str, Any]]:
    """The matrices compressed at another granularity than asked, and why."""
    out = []
    for name, scheme in choose(consts, plan, parameters).items():
        wanted = scheme_for(plan, name, parameters.get(name), consts[name]["consumers"])
        if scheme is None or wanted is None or scheme == wanted:
            continue
        shape = consts[name]["shape"]
        why = (f"its {shape[0]} output channels do not divide into groups of {wanted.group_size}"
               if wanted.granularity == "per_grouped_channel" else
               f"its {shape[-1]} input channels do not divide into blocks of {wanted.block_size}")
        out.append({"name": parameters[name], "shape": list(shape), "wanted": wanted.label(), "used": scheme.label(),
                    "reason": why})
    return out


def compress_model(mlmodel: Any, plan: Plan, parameters: dict[str, str], memo: KMeansMemo) -> Any:
    """One function's MLModel compressed. parameters: const op name -> HF parameter name (the only
    consts compressed)."""
    from coremltools.optimize.coreml import (OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig,
                                             linear_quantize_weights, palettize_weights)

    from runtimes.coreml.spec import program_consts

    choices = choose(program_consts(mlmodel), plan, parameters)
    for mode in ("palettize", "linear"):
        if not any(s is not None and s.mode == mode for s in choices.values()):
            continue
        configs: dict[str, Any] = {}
        for name, scheme in choices.items():
            if scheme is None or scheme.mode != mode:
                configs[name] = None
            elif mode == "palettize":
                configs[name] = OpPalettizerConfig(mode="custom", lut_function=memo.function(scheme.nbits),
                                                   granularity=scheme.granularity, group_size=scheme.group_size or 32,
                                                   weight_threshold=WEIGHT_THRESHOLD)
            else:
                configs[name] = OpLinearQuantizerConfig(mode="linear_symmetric", dtype=scheme.dtype,
                                                        granularity=scheme.granularity, block_size=scheme.block_size or 32,
                                                        weight_threshold=WEIGHT_THRESHOLD)
        config = OptimizationConfig(global_config=None, op_name_configs=configs)
        mlmodel = (palettize_weights if mode == "palettize" else linear_quantize_weights)(mlmodel, config)
    return mlmodel


def uncompressed(mlmodel: Any, plan: Plan, parameters: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Every model parameter stored as plain float16 in the compressed model, with the reason.
    shapes: every HF parameter's shape (vectors are renamed by coremltools' folding, so they are
    listed from here rather than found by name)."""
    from runtimes.coreml.spec import program_consts

    left = []
    for name, info in program_consts(mlmodel).items():
        if name in parameters and len(info["shape"]) >= 2:
            wanted = scheme_for(plan, name, parameters[name], info["consumers"])
            reason = ("left uncompressed by an override (skip)" if wanted is None
                      else "coremltools left it uncompressed (see its warnings in the log)")
            left.append({"name": parameters[name], "shape": list(info["shape"]), "elements": info["elements"],
                         "reason": reason})
    for name, shape in shapes.items():
        if len(shape) < 2:
            left.append({"name": name, "shape": list(shape), "elements": int(shape[0]) if shape else 1,
                         "reason": "a vector (norm weight or bias): kept float16, a rounding error in the size"})
    return left
