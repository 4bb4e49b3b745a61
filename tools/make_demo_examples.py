"""Writes examples/synthetic: a few shapes of the synthetic set's test split for demo.py.

  python tools/make_demo_examples.py [--out examples/synthetic] [--count 6]

One expression per image, chosen so that the examples show one target, several targets and
no target; the images are the set's own PNG bytes (64x64, the default job's input size).
"""
import argparse
import json
import pathlib

from deris_jax.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=str(ROOT / "examples" / "synthetic"))
  parser.add_argument("--count", type=int, default=6)
  args = parser.parse_args()
  config = next(c for c in synthetic.DerisSynthetic.BUILDER_CONFIGS if c.name == "shapes64")
  split = synthetic.generate_split(config, "test", dict(config.num_images)["test"])
  wanted = ["one", "several", "none"] * args.count
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lines, used = [], set()
  for entry in split.entries:
    kind = {0: "none", 1: "one"}.get(len(entry.target_ids), "several")
    if (entry.image_id in used or kind != wanted[len(lines)]
        or any(line["text"] == entry.expressions[0] for line in lines)):
      continue
    used.add(entry.image_id)
    name = f"test_{entry.image_id:03d}.png"
    (out / name).write_bytes(split.images[entry.image_id].data)
    lines.append({"image": name, "text": entry.expressions[0],
                  "targets": len(entry.target_ids)})
    if len(lines) == args.count:
      break
  (out / "examples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
  print(f"wrote {len(lines)} examples to {out}")


if __name__ == "__main__":
  main()
