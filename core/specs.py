"""Small typed specs shared by the compiler and the runtime: tensors, tolerances, precisions.

Model specs (which need torch to *use*) live in `medc.compile.registry`; these types are plain data so the runtime can
read them from a manifest without torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. A `str` in `shape` is a named dynamic axis (as in optimum's export configs)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Tolerance:
    """Worst-case closeness to the fp32 PyTorch reference that a built component must reach."""

    min_cosine: float
    max_abs: float | None = None  # None: not gated on absolute error (quantised graphs)

    def check(self, cosine: float, max_abs: float) -> bool:
        return cosine >= self.min_cosine and (self.max_abs is None or max_abs <= self.max_abs)

    def describe(self) -> str:
        s = f"cosine >= {self.min_cosine}"
        return s if self.max_abs is None else f"{s} and max abs error <= {self.max_abs:g}"

    def to_json(self) -> dict:
        return asdict(self)


# The gate thresholds of the project (worst case over all held-out inputs).
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-4),
    "fp16": Tolerance(min_cosine=0.999),
    "bf16": Tolerance(min_cosine=0.999),  # 8 mantissa bits to fp16's 11, with fp32 accumulation (OpenVINO CPU)
    "int8": Tolerance(min_cosine=0.99),
    "int4": Tolerance(min_cosine=0.98),  # per-component logits; real weights are gated on perplexity (+1.5%)
}
# Gemma 3's decoder: logits are O(10-50) over a 262k vocab, so an absolute 1e-4 is a few parts per million, inside
# fp32's accumulation-order noise across layers; its fp32 bar is 1e-3 absolute plus identical greedy tokens in the
# whole-model gate on real weights. int4 on *random* weights: each int4 MatMul adds noise and random layers amplify
# it instead of averaging it out, so this bar only proves the graph is the right one (a wrong graph scores ~0);
# accuracy is gated on real weights by perplexity. Measurements: benchmarks/results/design-measurements.md.
DECODER_TOLERANCES: dict[str, Tolerance] = {**DEFAULT_TOLERANCES, "fp32": Tolerance(min_cosine=0.99999, max_abs=1e-3),
                                            "int4": Tolerance(min_cosine=0.75)}
# Components whose gate differs from the default, by the name they have in every bundle.
COMPONENT_TOLERANCES: dict[str, dict[str, Tolerance]] = {"decoder": DECODER_TOLERANCES}


def gate_tolerance(component: str, precision: str) -> Tolerance:
    """The bar a component must meet, from medc's own table: the build gates against it and `medc verify` re-checks
    against it, never against a threshold read from a manifest (which anyone holding the bundle could loosen)."""
    table = COMPONENT_TOLERANCES.get(component, DEFAULT_TOLERANCES)
    if precision not in table:
        from medc.errors import MedcError

        raise MedcError(f"component {component} has precision {precision!r}; medc gates {', '.join(table)}. "
                        "Rebuild the bundle with this medc.")
    return table[precision]
