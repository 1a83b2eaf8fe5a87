"""A disk cache of evaluated op lists, so that a repeated command skips sympy.

Building a model's symbolic op lists needs sympy (about 0.35 s to import) and
the build itself (0.1-0.4 s); the command line answers in under half a second
only when it does neither. The first time a (spec, phase, options) is counted
from the command line, its ops are built as always and each distinct
expression is printed as exact Python arithmetic (ints, `Fraction`,
`math.ceil`, `min`, `max`) into a small module compiled to a code object,
stored under the cache folder; later runs load that code and evaluate the ops
at B, S, T and S_enc with no sympy.

Conventions:
- The key hashes flopsim's own source files (every .py under the package), the
  spec's JSON, the phase and the options, and the Python version: any change to
  the code or the spec makes a new entry; nothing stale is ever read.
- Values are exact: integers stay integers; a non-integer (an expectation)
  becomes a float, as `flopsim.count.evaluate` returns it.
- An expression with anything the printer does not know is not cached (the
  caller falls back to sympy); so is a failure to write (a read-only home).
- On for the command line's single-model commands only (count, predict,
  compare, memory, hardware list: `use()`, which the process entry point
  `flopsim.cli.main` allows with `allow()`): commands that count hundreds of
  generated specs once (isoflop, report, plan, sweep) would spend longer
  printing them than they save. The Python API evaluates with sympy unless
  `enable()` is called. `FLOPSIM_CACHE=0` turns it off; `FLOPSIM_CACHE_DIR` moves it (default
  `$XDG_CACHE_HOME/flopsim`, else `~/.cache/flopsim`).
- YAML files (specs, hardware, calibrations) are kept parsed, as JSON, keyed by a
  hash of their text: parsing a calibration is a tenth of a second in pure Python, and
  with every file read back PyYAML is not even imported.
- A calibration's efficiency look-ups (flopsim.roofline.op_times) are kept too, one
  JSON file per calibration, keyed by the code's hash, the calibration's JSON and the
  installed numpy and scipy (their version files: the interpolation's numerics): a
  command whose look-ups were all made before never imports numpy. Each entry is the
  (compute, memory) pair `Calibration.efficiency` returned for one argument tuple,
  floats stored exactly (JSON writes a float's shortest round-tripping repr).
- Writes are atomic (a temporary file renamed into place).
- The folder is bounded: every key changes with the code, so entries of older
  versions are never read again. The first write of a process (`_prune`) looks at
  the folder once and, when it holds more than MAX_BYTES (256 MiB;
  `FLOPSIM_CACHE_MAX_MB` sets it), removes the files written longest ago until
  it holds three quarters of that; a temporary file a killed process left is
  removed once it is an hour old.
"""

from __future__ import annotations

import hashlib
import marshal
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

FORMAT = 1  # the cached files' layout; bump when it changes
MAX_BYTES = 256 * 2**20  # the folder's size bound (the module docstring); FLOPSIM_CACHE_MAX_MB overrides it
STALE_TMP_S = 3600.0  # a temporary file older than this was left by a killed process
_allowed = False
_enabled = False
_pruned = False


def enable(on: bool = True) -> None:
    global _enabled
    _enabled = on


def allow() -> None:
    """The command-line process may use the cache (flopsim.cli.main)."""
    global _allowed
    _allowed = True


def use() -> None:
    """A command that gains from the cache turns it on, where the process allows it."""
    if _allowed:
        enable()


def enabled() -> bool:
    return _enabled and os.environ.get("FLOPSIM_CACHE", "1") != "0"


def cache_dir() -> Path:
    env = os.environ.get("FLOPSIM_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flopsim"


@lru_cache(maxsize=1)
def code_hash() -> str:
    """A hash of every source file of the package (what the op lists depend on)."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(f"{FORMAT} {sys.version}".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def key(spec, phase: str, options: str = "") -> str:
    return hashlib.sha256(f"{code_hash()}|{spec.model_dump_json()}|{phase}|{options}".encode()).hexdigest()[:40]


def costs(spec, phase: str, numbers: dict, build: Callable[[], list], options: str = "") -> list:
    """The OpCosts of `build()`'s ops at `numbers` ({"B", "S", "T", "S_enc"} -> int), through
    the cache when enabled (see the module docstring)."""
    ops = None
    if enabled():
        name = key(spec, phase, options)
        fn = _load(name)
        if fn is None:
            ops = build()
            fn = _store(name, ops)
        if fn is not None:
            return fn(numbers)
    from flopsim.count import evaluate_ops
    from flopsim.ops.symbols import B, S, S_enc, T

    symbols = {"B": B, "S": S, "T": T, "S_enc": S_enc}
    return evaluate_ops(build() if ops is None else ops, {symbols[k]: v for k, v in numbers.items()})


def _parsed_path(text: str) -> Path:
    return cache_dir() / f"{hashlib.sha256(f'{FORMAT}|{text}'.encode()).hexdigest()[:40]}.yaml.json"


def parsed(text: str):
    """A YAML text's data parsed before (None when not cached or the cache is off): a
    command whose spec, hardware and calibration all come from here never imports PyYAML."""
    if not enabled():
        return None
    import json

    try:
        return json.loads(_parsed_path(text).read_text())
    except (OSError, ValueError):
        return None


def store_parsed(text: str, data) -> None:
    """Keep `data`, parsed from `text`, when it is plain JSON data (it reads back equal)."""
    if not enabled():
        return
    import json

    try:
        dumped = json.dumps(data)
        if json.loads(dumped) != data:  # a tuple, a non-string key, a date: not kept
            return
    except (TypeError, ValueError):
        return
    _write(_parsed_path(text), dumped.encode())


class Efficiencies:
    """`calibration.efficiency` memoized within the run and, when the cache is enabled,
    across runs (see the module docstring); `save()` writes the run's new look-ups."""

    def __init__(self, calibration):
        self.calibration, self.known, self.new, self.path = calibration, {}, False, None
        if not enabled():
            return
        import json

        try:
            self.path = cache_dir() / f"{_efficiency_key(calibration)}.eff.json"
        except (ValueError, TypeError):  # a `measured` block JSON cannot hold: memoized in this run only
            return
        try:
            self.known = {k: tuple(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError, TypeError):
            self.known = {}

    def __call__(self, *args):
        name = _args_key(args)  # None: kept for this run only, under the arguments themselves
        memo = args if name is None else name
        try:
            if memo in self.known:
                return self.known[memo]
        except TypeError:  # unhashable (an array): not memoized
            return self.calibration.efficiency(*args)
        value = self.known[memo] = self.calibration.efficiency(*args)
        self.new = self.new or (self.path is not None and name is not None and _storable(value))
        return value

    def save(self) -> None:
        if not self.new:
            return
        import json

        kept = {k: list(v) for k, v in self.known.items() if type(k) is str and _storable(v)}
        _write(self.path, json.dumps(kept, sort_keys=True).encode())
        self.new = False


def _efficiency_key(calibration) -> str:
    from importlib.util import find_spec

    libraries = []
    for name in ("numpy", "scipy"):
        spec = find_spec(name)
        version = Path(spec.origin).parent / "version.py" if spec is not None and spec.origin else None
        try:
            libraries.append(version.read_text() if version is not None else "")
        except OSError:
            libraries.append("")
    text = f"{code_hash()}|{libraries}|{calibration.model_dump_json(warnings=False)}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


_PLAIN = (str, int, float, bool, type(None))


def _args_key(args: tuple) -> Optional[str]:
    """repr(args) where they are plain values and tuples of them (a repr that names them
    exactly), else None (an array, a sympy number: not kept on disk)."""
    for value in args:
        if type(value) is tuple:
            if not all(type(v) in _PLAIN for v in value):
                return None
        elif type(value) not in _PLAIN:
            return None
    return repr(args)


def _storable(value) -> bool:
    """A pair of finite Python floats (what JSON gives back exactly)."""
    import math

    return (type(value) is tuple and len(value) == 2
            and all(type(v) is float and math.isfinite(v) for v in value))


def max_bytes() -> int:
    """The cache folder's size bound: FLOPSIM_CACHE_MAX_MB (MiB) when it is a positive
    number, else MAX_BYTES (a cache setting that cannot stop a command)."""
    try:
        mib = float(os.environ["FLOPSIM_CACHE_MAX_MB"])
    except (KeyError, ValueError):
        return MAX_BYTES
    return int(mib * 2**20) if mib > 0 and mib != float("inf") else MAX_BYTES


def _prune(folder: Path) -> None:
    """Once a process: the files written longest ago removed until the folder holds at
    most three quarters of max_bytes() (when it holds more than max_bytes()), and stale
    temporary files (the module docstring). Files another process removes meanwhile
    are skipped."""
    global _pruned
    if _pruned:
        return
    _pruned = True
    import time

    entries, now = [], time.time()
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if entry.name.startswith(".tmp-") and now - st.st_mtime > STALE_TMP_S:
                        os.unlink(entry.path)
                        continue
                    entries.append((st.st_mtime, st.st_size, entry.path))
                except OSError:
                    continue
    except OSError:
        return
    total, bound = sum(size for _, size, _ in entries), max_bytes()
    if total <= bound:
        return
    for _, size, path in sorted(entries):
        if total <= bound * 3 // 4:
            break
        try:
            os.unlink(path)
            total -= size
        except OSError:
            continue


def _write(path: Path, payload: bytes) -> None:
    """Atomic: a temporary file renamed into place; nothing left behind on failure.
    The first write of a process bounds the folder's size (`_prune`)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _prune(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _load(name: str) -> Optional[Callable]:
    path = cache_dir() / f"{name}.ops"
    try:
        code = marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):
        return None
    return _make(code)


def _make(code) -> Callable:
    import math
    from fractions import Fraction

    namespace = {"F": Fraction, "ceil": math.ceil, "floor": math.floor}
    exec(code, namespace)
    return lambda numbers: _op_costs(namespace, numbers)


def _store(name: str, ops: list) -> Optional[Callable]:
    from flopsim.opcache_print import module_source

    source = module_source(ops)
    if source is None:
        return None
    code = compile(source, f"<flopsim op cache {name}>", "exec")
    _write(cache_dir() / f"{name}.ops", marshal.dumps(code))
    return _make(code)


def _number(value):
    """int when whole and exact, else float (as flopsim.count._number)."""
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    return int(value) if value.denominator == 1 else float(value)


def compiled(ops: list, extra: tuple = ()) -> Optional[Callable]:
    """f(numbers, *extra_values) -> the ops' OpCosts at {"B", "S", "T"[, "S_enc"]}, compiled in
    memory as the cached modules are (exact, no sympy; `extra`: further symbols' names, their
    values in order); None when an expression is not printable."""
    import math
    from fractions import Fraction

    from flopsim.opcache_print import module_source

    source = module_source(ops, extra)
    if source is None:
        return None
    namespace = {"F": Fraction, "ceil": math.ceil, "floor": math.floor}
    exec(compile(source, "<flopsim compiled ops>", "exec"), namespace)
    return lambda numbers, *values: _op_costs(namespace, numbers, values)


def _op_costs(namespace: dict, numbers: dict, extra: tuple = ()) -> list:
    from flopsim.count import OpCost
    from flopsim.ops.fields import COST_FIELDS

    values = [_number(v) for v in namespace["values"](numbers["B"], numbers["S"], numbers["T"],
                                                      numbers.get("S_enc", 1), *extra)]
    out = []
    for static, fields, tags, gemm, kernels in namespace["OPS"]:
        name, kind, layer, module, pass_, variant, host_sync = static
        out.append(OpCost(
            name=name, kind=kind, layer=layer, module=module, pass_=pass_, variant=variant, host_sync=host_sync,
            gemm=tuple(values[i] for i in gemm) if gemm is not None else None,
            # (key, True, expression index) or (key, False, the value itself), in the op's order
            tags={k: values[v] if is_expr else v for k, is_expr, v in tags},
            kernels=values[kernels], **{f: values[i] for f, i in zip(COST_FIELDS, fields)},
        ))
    return out
