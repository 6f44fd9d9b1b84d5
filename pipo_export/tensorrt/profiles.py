"""Optimization profiles and precision of `pipo-export build`, derived from the export manifest
and the build flags. Pure Python (no TensorRT): tested on any machine.

Context accounting (the same as the runtime's request check): a prompt of T tokens (T even,
`input_ids` is [batch, 2*prompt_pairs]) generating S steps needs T + 2*S <= max_context tokens,
with S >= 1. With M = max_context // 2 pairs and a cache of one slot per pair (PIPO; one slot
per token for `--mode regular`, k = 2 slots per pair, else k = 1):

    prefill  prompt_tokens in [2, 2*(M-1)]
    decode   past_slots    in [k, k*(M-1) - 1]        (present = past + 1 <= k*(M-1))
    buffers  every cache state is allocated for k*(M-1) slots (max_slots)

`--profiles B1,B2,...` splits the context range at those token counts: profile i covers prompts
of (B_{i-1}, B_i] tokens and decode caches of (k*B_{i-1}/2, k*B_i/2] slots (the last profile
ends at max_context); opt is the middle of each range, batch is [1, ceil(max_batch/2),
max_batch] in every profile.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipo_graphs.contract import DECODE, PREFILL, Mode
from pipo_graphs.engine_manifest import DimRange, EngineProfile
from pipo_graphs.manifest import Manifest
from pipo_graphs.shapes import resolve_shape, state_bytes as _state_bytes

from pipo_export.errors import PipoError


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"

    @property
    def dtype(self) -> str:
        """The export dtype whose graphs already carry this precision."""
        return {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[self.value]

    @classmethod
    def of_dtype(cls, dtype: str) -> "Precision":
        return {"float32": cls.FP32, "float16": cls.FP16, "bfloat16": cls.BF16}[dtype]


class BuildError(PipoError):
    """The engines cannot be built from this export with these flags."""


@dataclass(frozen=True)
class ContextLimits:
    """What the engines accept: max_batch rows, max_context tokens (prompt + generated)."""

    max_batch: int
    max_context: int
    slots_per_pair: int  # 1 (PIPO: a slot per pair), 2 (regular: a slot per token)

    @property
    def max_pairs(self) -> int:
        return self.max_context // 2

    @property
    def prompt_tokens(self) -> tuple[int, int]:
        return 2, 2 * (self.max_pairs - 1)

    @property
    def past_slots(self) -> tuple[int, int]:
        return self.slots_per_pair, self.max_slots - 1

    @property
    def max_slots(self) -> int:
        return self.slots_per_pair * (self.max_pairs - 1)


def context_limits(manifest: Manifest, max_batch: int = 1,
                   max_context: int | None = None) -> ContextLimits:
    """Validate --max-batch/--max-context against the export (max_context defaults to the
    export's and may not exceed it)."""
    export_max = manifest.model.max_context
    n = export_max if max_context is None else int(max_context)
    if max_batch < 1:
        raise BuildError(f"--max-batch must be >= 1, got {max_batch}")
    if n > export_max:
        raise BuildError(f"--max-context {n} exceeds the export's max_context {export_max}; "
                         "re-export with a larger --max-context")
    if n < 6:
        raise BuildError(f"--max-context must be >= 6 tokens (a 2-token prompt and 2 steps), got {n}")
    spp = 2 if manifest.export.mode == Mode.REGULAR else 1
    return ContextLimits(max_batch=max_batch, max_context=n, slots_per_pair=spp)


def parse_profile_bounds(text: str) -> tuple[int, ...]:
    """'512,4096' -> (512, 4096): context sizes (tokens) where one profile ends and the next
    begins."""
    try:
        bounds = tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise BuildError(f"--profiles takes comma-separated token counts, e.g. 512,4096; "
                         f"got {text!r}") from None
    if list(bounds) != sorted(set(bounds)):
        raise BuildError(f"--profiles bounds must be strictly increasing, got {text!r}")
    return bounds


def _mid(lo: int, hi: int, even: bool = False) -> int:
    m = (lo + hi) // 2
    if even:
        m -= m % 2
        m = max(m, lo)
    return m


def derive_profiles(limits: ContextLimits, bounds: tuple[int, ...] = ()) -> list[EngineProfile]:
    """One profile per context range (see the module doc). Raises BuildError for bounds outside
    (2, max_context) or ranges left empty."""
    for b in bounds:
        if not 2 < b < limits.max_context:
            raise BuildError(f"--profiles bound {b} must be between 2 and --max-context "
                             f"{limits.max_context} (exclusive)")
    edges = [0] + [b + b % 2 for b in bounds] + [limits.max_context]
    t_min, t_max = limits.prompt_tokens
    p_min, p_max = limits.past_slots
    k = limits.slots_per_pair
    batch = DimRange(1, (limits.max_batch + 1) // 2, limits.max_batch)
    out = []
    for i, (lo, hi) in enumerate(zip(edges, edges[1:])):
        t_lo, t_hi = max(t_min, lo + 2), min(t_max, hi)
        s_lo = p_min if i == 0 else max(p_min, k * lo // 2 + 1)
        s_hi = p_max if i == len(edges) - 2 else min(p_max, k * hi // 2)
        if t_lo > t_hi or s_lo > s_hi:
            raise BuildError(f"profile {i} ({lo}..{hi} tokens) is empty for --max-context "
                             f"{limits.max_context}; move or drop that --profiles bound")
        out.append(EngineProfile(batch, DimRange(t_lo, _mid(t_lo, t_hi, even=True), t_hi),
                                 DimRange(s_lo, _mid(s_lo, s_hi), s_hi)))
    return out


def input_shapes(manifest: Manifest, graph: str, profile: EngineProfile,
                 max_past: int | None = None
                 ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Every input of `graph` -> (min, opt, max) concrete shapes for one profile, from the
    manifest's symbolic shapes (batch; 2*prompt_pairs and past_pairs 0..max_past for the
    prefill, default the profile's largest past; past_pairs for the decode; fixed dims such as
    [batch, 128, 3] keep their ints)."""
    out = {}
    for spec in manifest.graphs[graph].inputs:
        shapes = []
        for which in ("min", "opt", "max"):
            dims = {"batch": getattr(profile.batch, which)}
            if graph == PREFILL:  # contract 1.1: a prefill continues 0..max past slots
                dims["prompt_pairs"] = getattr(profile.prompt_tokens, which) // 2
                top = profile.past_slots.max if max_past is None else max_past
                dims["past_pairs"] = top if which == "max" else 0
            elif graph == DECODE:
                dims["past_pairs"] = getattr(profile.past_slots, which)
            shapes.append(resolve_shape(spec.shape, dims))
        out[spec.name] = tuple(shapes)
    return out


def state_bytes(manifest: Manifest, limits: ContextLimits, batch: int = 1) -> int:
    """Device bytes of one full-size set of cache/state buffers for `batch` rows (the runtime
    allocates two: ping-pong)."""
    return _state_bytes(manifest.states, batch, limits.max_slots)


def resolve_precision(requested: Precision | None, export_dtype: str, trt_major: int | None = None
                      ) -> tuple[Precision, bool]:
    """-> (precision, strongly_typed).

    The export's own dtype builds a strongly typed network (types from the ONNX graph; the only
    mode TensorRT 11 has). fp16/bf16 from a float32 export use TensorRT 10's weak-typing builder
    flags (deprecated since 10.12, removed in 11). Anything else is refused."""
    native = Precision.of_dtype(export_dtype)
    precision = requested or native
    if precision == native:
        return precision, True
    if native != Precision.FP32:
        raise BuildError(f"--precision {precision.value} on a {export_dtype} export: the graphs "
                         f"already compute in {export_dtype}; use --precision {native.value} or "
                         f"re-export with --dtype {precision.dtype}")
    if trt_major is not None and trt_major >= 11:
        raise BuildError(f"--precision {precision.value} from a float32 export needs TensorRT 10's "
                         f"{precision.value.upper()} builder flag, removed in TensorRT 11 (strong "
                         f"typing only); re-export with --dtype {precision.dtype} --target tensorrt")
    return precision, False
