"""Instruction mix of the kernels in a cuobjdump -sass listing.

    python tools/sass_mix.py FILE.sass [--kernel SUBSTRING] [--per N] [--top K]

Prints, per kernel, the number of instructions in its code (static: every
instruction once, whatever the branches), and the most frequent opcodes.
--per N also divides the total by N (e.g. the values a thread handles).
"""
import argparse
import collections
import re

INSN = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("sass")
    ap.add_argument("--kernel", default="")
    ap.add_argument("--per", type=int, default=0)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    for chunk in open(args.sass).read().split("Function : ")[1:]:
        name = chunk.split("\n", 1)[0].strip()
        if args.kernel not in name:
            continue
        ops = collections.Counter(m.group(1) for m in INSN.finditer(chunk))
        total = sum(ops.values())
        per = f", {total / args.per:.1f} per value" if args.per else ""
        print(f"{name}: {total} instructions{per}")
        print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))


if __name__ == "__main__":
    main()
