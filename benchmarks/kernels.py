"""Fused computations of a compiled program, and how many of them are distinct (BENCHMARKS.md).

XLA:CPU emits one kernel per *distinct* fused computation and reuses it for identical copies,
so its code generation (most of a compile on the CPU) follows the distinct count, and its HLO
passes the instruction count. Measured on the default job's train step (1,326 distinct of
5,103): a variant with 2,708 distinct and fewer fusions compiled ~11 s slower, one with 1,211
distinct and 890 fewer fusions in the same time (BENCHMARKS.md "Five compile leads"). On this
noisy 2-core machine the count is a steadier measure of such a change than the wall time.

  fusion_stats(compiled.as_text()) -> {"fusions": N, "distinct_fusions": M}

Two fused computations count as one when their text is equal after dropping metadata and
renaming every value in order of appearance; a computation they call (a reduction's
`to_apply`, ...) stands for its own normalised text, so a sum and a max of one shape differ.
"""
import hashlib
import re
from typing import Dict

_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.\-]+) \((.*?)\) -> (.*?) \{\n(.*?)\n\}", re.M | re.S)
_FUSION_CALL = re.compile(r" fusion\(.*?calls=(%[\w.\-]+)")
_METADATA = re.compile(r", metadata=\{[^}]*\}")
_NAME = re.compile(r"%[\w.\-]+")
_SIGNATURE_NAME = re.compile(r"[\w.\-]+: ")


def _computations(hlo_text: str) -> Dict[str, str]:
  """{computation name: its signature (parameter types only) and body} of an HLO module's
  text."""
  return {m.group(1): f"({_SIGNATURE_NAME.sub('', m.group(2))}) -> {m.group(3)}\n{m.group(4)}"
          for m in _COMPUTATION.finditer(hlo_text)}


def _normaliser(computations: Dict[str, str]):
  """name -> a digest of the computation's text up to value names and metadata."""
  digests: Dict[str, str] = {}

  def digest(name: str) -> str:
    if name not in digests:
      renamed: Dict[str, str] = {}

      def rename(match) -> str:
        token = match.group(0)
        if token in computations:  # a called computation: its own normalised text
          return "@" + digest(token)
        return renamed.setdefault(token, f"%v{len(renamed)}")

      body = _METADATA.sub("", computations[name])
      digests[name] = hashlib.sha1(_NAME.sub(rename, body).encode()).hexdigest()
    return digests[name]

  return digest


def fusion_stats(hlo_text: str) -> Dict[str, int]:
  """The fusion instructions of a compiled HLO module's text and the distinct fused
  computations among them."""
  computations = _computations(hlo_text)
  callees = _FUSION_CALL.findall(hlo_text)
  unknown = sorted(set(callees) - set(computations))
  if unknown:
    raise ValueError(f"fusion_stats: fusions call computations not in the text: {unknown[:3]}")
  digest = _normaliser(computations)
  return dict(fusions=len(callees), distinct_fusions=len({digest(c) for c in callees}))
