#!/usr/bin/env python3
"""Attributes a callgrind profile (made with --dump-instr=yes) to lines of src/.

    attribute.py CALLGRIND_OUT BINARY REQUESTS REPO

Each instruction's cost goes to the innermost inlined frame that is a line of REPO/src
(addr2line -i gives the inline chain of its address): "self" is code inlined there. A
call from an address whose chain reaches src/ adds the callee's inclusive cost to that
line as "calls" (a cost can be counted at several lines up a call chain). Everything
is divided by REQUESTS. Instructions in no src/ frame are listed by function.
"""
import collections
import re
import subprocess
import sys

out, binary, requests, repo = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
src = repo.rstrip("/") + "/src/"

self_cost = collections.Counter()
call_cost = collections.Counter()
function_at = {}
names = {}
function = None
last = [0, 0]
after_calls = False


def position(token, i):
    if token == "*":
        return last[i]
    if token[0] in "+-":
        sign = 1 if token[0] == "+" else -1
        return last[i] + sign * int(token[1:], 0)
    return int(token, 0)


for line in open(out, errors="replace"):
    if not line.strip():
        continue
    if line[0].isdigit() or line[0] in "+-*":
        parts = line.split()
        address = position(parts[0], 0)
        last[0] = address
        if len(parts) > 2:
            last[1] = position(parts[1], 1)
        cost = int(parts[-1]) if len(parts) >= 3 else 0
        (call_cost if after_calls else self_cost)[address] += cost
        after_calls = False
        function_at[address] = function
        continue
    key, _, value = line.rstrip("\n").partition("=")
    if key in ("fn", "cfn"):
        m = re.match(r"\((\d+)\)(?:\s+(.*))?", value)
        if m and m.group(2):
            names[m.group(1)] = m.group(2)
        if key == "fn" and m:
            function = names.get(m.group(1))
    elif key == "calls":
        after_calls = True

addresses = sorted(set(self_cost) | set(call_cost))
lines = subprocess.run(
    ["addr2line", "-i", "-f", "-C", "-a", "-e", binary],
    input="\n".join(hex(a) for a in addresses),
    capture_output=True,
    text=True,
    check=True,
).stdout.splitlines()
chains = {}
i, current = 0, None
while i < len(lines):
    if lines[i].startswith("0x"):
        current = int(lines[i], 16)
        chains[current] = []
        i += 1
        continue
    location = lines[i + 1] if i + 1 < len(lines) else "?"
    chains[current].append((lines[i], location))
    i += 2


def src_line(address):
    for _, location in chains.get(address, []):
        if src in location:
            return location.replace(repo.rstrip("/") + "/", "").split(" ")[0]
    return None


by_line, calls_at, outside = collections.Counter(), collections.Counter(), collections.Counter()
for address, cost in self_cost.items():
    at = src_line(address)
    if at:
        by_line[at] += cost
    else:
        chain = chains.get(address) or [("?", "")]
        name = chain[-1][0]
        if name.startswith("GCC_except") or name == "??":
            name = function_at.get(address) or "?"
        outside[name[:110]] += cost
for address, cost in call_cost.items():
    at = src_line(address)
    if at:
        calls_at[at] += cost

total = sum(self_cost.values())
print(f"instructions per request: {total // requests}")
print(f"  inlined into src/: {sum(by_line.values()) // requests}")
print("\nlines of src/ (self: inlined there; calls: inclusive cost of calls made there)")
text = {}
for at in set(by_line) | set(calls_at):
    path, _, number = at.rpartition(":")
    if number.isdigit():
        try:
            text[at] = open(f"{repo}/{path}").read().splitlines()[int(number) - 1].strip()
        except (OSError, IndexError):
            text[at] = ""
rows = sorted(set(by_line) | set(calls_at), key=lambda a: -(by_line[a] + calls_at[a]))
for at in rows[:70]:
    s, c = by_line[at] // requests, calls_at[at] // requests
    print(f"{s:6d} {c:7d}  {at:34s} {text.get(at, '')[:70]}")
print("\noutside src/ (self, by the outermost function of the inline chain)")
for name, cost in outside.most_common(40):
    print(f"{cost // requests:6d}  {name}")
