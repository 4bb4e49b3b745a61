"""deris_jax/malloc.py: which allocator is chosen, the one re-execution, and every command asks first."""
import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

from deris_jax import malloc

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("train.py", "eval.py", "predict.py", "demo.py", "bench.py",
            "deris_jax/parity/__main__.py", "benchmarks/compile_time.py")


def _touch(folder: pathlib.Path, name: str) -> str:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_bytes(b"\x7fELF")
  return str(folder / name)


def test_auto_prefers_tcmalloc_over_jemalloc_whatever_the_folder_order(tmp_path):
  jemalloc = _touch(tmp_path / "a", "libjemalloc.so.2")
  tcmalloc = _touch(tmp_path / "b", "libtcmalloc_minimal.so.4")
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  assert malloc.find("auto", dirs) == tcmalloc
  os.remove(tcmalloc)
  assert malloc.find("auto", dirs) == jemalloc
  os.remove(jemalloc)
  assert malloc.find("auto", dirs) is None  # none installed: nothing to do


def test_off_and_an_explicit_path(tmp_path):
  library = _touch(tmp_path, "libmine.so")
  assert malloc.find("off", [str(tmp_path)]) is None
  assert malloc.find(library, []) == library
  with pytest.raises(SystemExit, match=r"DERIS_JAX_MALLOC='/no/such/lib.so' is neither"):
    malloc.find("/no/such/lib.so", [])


def test_search_dirs_start_with_ld_library_path(monkeypatch):
  monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x/lib::/opt/y/lib")
  dirs = malloc.search_dirs()
  assert dirs[:2] == ("/opt/x/lib", "/opt/y/lib")
  assert len(dirs) == len(set(dirs)) and "" not in dirs


class _Exec(Exception):
  pass


@pytest.fixture
def execve_calls(monkeypatch):
  calls = []

  def fake_execve(path, argv, env):
    calls.append((path, argv, env))
    raise _Exec

  monkeypatch.setattr(os, "execve", fake_execve)
  monkeypatch.setattr(sys, "platform", "linux")
  monkeypatch.delenv(malloc.REEXEC_ENV, raising=False)
  monkeypatch.delenv("LD_PRELOAD", raising=False)
  return calls


def test_reexecutes_with_the_library_preloaded(tmp_path, monkeypatch, execve_calls):
  library = _touch(tmp_path, "libtcmalloc_minimal.so.4")
  monkeypatch.setenv(malloc.ENV, library)
  monkeypatch.setattr(malloc, "active", lambda: None)
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libother.so")
  with pytest.raises(_Exec):
    malloc.reexec_with_fast_malloc()
  (path, argv, env), = execve_calls
  assert path == sys.executable and argv == [sys.executable] + list(sys.orig_argv[1:])
  assert env["LD_PRELOAD"] == f"{library}:/usr/lib/libother.so"  # the user's preload is kept
  assert env[malloc.REEXEC_ENV] == library


@pytest.mark.parametrize("case", ["off", "already re-executed", "already loaded", "not linux",
                                  "none installed"])
def test_no_reexecution(case, tmp_path, monkeypatch, execve_calls):
  library = _touch(tmp_path, "libtcmalloc_minimal.so.4")
  monkeypatch.setenv(malloc.ENV, library)
  monkeypatch.setattr(malloc, "active", lambda: None)
  if case == "off":
    monkeypatch.setenv(malloc.ENV, "off")
  elif case == "already re-executed":
    monkeypatch.setenv(malloc.REEXEC_ENV, library)
  elif case == "already loaded":
    monkeypatch.setattr(malloc, "active", lambda: "libjemalloc.so.2")
  elif case == "not linux":
    monkeypatch.setattr(sys, "platform", "darwin")
  else:
    monkeypatch.setenv(malloc.ENV, "auto")
    monkeypatch.setattr(malloc, "search_dirs", lambda: (str(tmp_path / "empty"),))
  malloc.reexec_with_fast_malloc()
  assert execve_calls == []


def test_preload_for_children_puts_the_library_in_this_process_environment(
    tmp_path, monkeypatch, execve_calls):
  library = _touch(tmp_path, "libtcmalloc_minimal.so.4")
  monkeypatch.setenv(malloc.ENV, library)
  monkeypatch.setattr(malloc, "active", lambda: None)
  monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libother.so")
  monkeypatch.delenv("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", raising=False)
  assert malloc.preload_for_children() == library
  assert execve_calls == []  # this process goes on as it is
  assert os.environ["LD_PRELOAD"] == f"{library}:/usr/lib/libother.so"
  assert os.environ[malloc.REEXEC_ENV] == library  # a child does not re-execute again
  assert os.environ["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)


def test_preload_for_children_changes_nothing_where_none_is_wanted(
    tmp_path, monkeypatch, execve_calls):
  monkeypatch.setenv(malloc.ENV, "off")
  before = dict(os.environ)
  assert malloc.preload_for_children() is None
  assert dict(os.environ) == before


_CHILD = """
import json, os, sys
with open(sys.argv[1], "a") as log:
  log.write(f"{os.getpid()}\\n")
from deris_jax import malloc
malloc.reexec_with_fast_malloc()
print(json.dumps(dict(argv=sys.argv[1:], preload=os.environ.get("LD_PRELOAD"),
                      active=malloc.active(), stdin=sys.stdin.read())))
"""


def _libm() -> str:
  """A library every Linux Python has mapped: preloading it is harmless."""
  with open("/proc/self/maps") as maps:
    paths = {line.split()[-1] for line in maps if "/libm.so" in line}
  if not paths:
    pytest.skip("no libm mapped into this Python")
  return sorted(paths)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
@pytest.mark.parametrize("setting", ["path", "off"])
def test_a_real_process_restarts_once_with_its_arguments_and_input(setting, tmp_path):
  libm = _libm()
  starts = tmp_path / "starts"
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.REEXEC_ENV)}
  env.update({malloc.ENV: libm if setting == "path" else "off", "PYTHONPATH": str(ROOT)})
  done = subprocess.run([sys.executable, "-c", _CHILD, str(starts), "two words"], env=env,
                        input="from stdin", capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  out = json.loads(done.stdout)
  pids = starts.read_text().split()
  assert out["argv"] == [str(starts), "two words"] and out["stdin"] == "from stdin"
  if setting == "path":
    assert len(pids) == 2 and pids[0] == pids[1]  # the same process, started twice
    assert out["preload"] == libm and out["active"] == os.path.basename(libm)
  else:
    assert len(pids) == 1 and out["preload"] is None and out["active"] is None


_PARENT = """
import os, subprocess, sys
from deris_jax import malloc
print(malloc.preload_for_children(), flush=True)
subprocess.run([sys.executable, "-c", "import os; from deris_jax import malloc; "
                "print(os.environ['LD_PRELOAD'], malloc.active())"], check=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_child_started_after_preload_for_children_runs_with_the_library():
  libm = _libm()
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", malloc.REEXEC_ENV)}
  env.update({malloc.ENV: libm, "PYTHONPATH": str(ROOT)})
  done = subprocess.run([sys.executable, "-c", _PARENT], env=env, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  parent, child = done.stdout.splitlines()
  assert parent == libm
  assert child == f"{libm} {os.path.basename(libm)}"  # started with it preloaded


@pytest.mark.parametrize("script", COMMANDS)
def test_each_command_asks_first_before_its_heavy_imports(script):
  tree = ast.parse((ROOT / script).read_text())
  body = tree.body[1:]  # after the docstring
  assert ast.unparse(body[0]) == "from deris_jax import malloc", script
  guard = body[1]
  assert isinstance(guard, ast.If) and ast.unparse(guard.test) == "__name__ == '__main__'"
  assert [ast.unparse(s) for s in guard.body] == ["malloc.reexec_with_fast_malloc()"], script


def test_describe_names_the_allocator_or_the_c_library(monkeypatch):
  monkeypatch.setattr(malloc, "active", lambda: "libtcmalloc_minimal.so.4.5.10")
  assert malloc.describe() == "libtcmalloc_minimal.so.4.5.10"
  monkeypatch.setattr(malloc, "active", lambda: None)
  assert malloc.describe() == "of the C library"
