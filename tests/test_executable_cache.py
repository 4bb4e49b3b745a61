"""executable_cache: compiled programs on disk under what they are built from.

A program compiled afresh is written and read back without tracing, runs the same and keeps
its donation; its key changes with everything it names; a program jax read back from its own
cache is not written (XLA:CPU cannot serialize it again); a bad file is compiled again; old
files are pruned; nothing is written with the cache off or with several processes.
"""
import collections
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deris_jax import executable_cache
from deris_jax import sharding as S


def _toy(traces):
  """A step-like program: (state, batch) -> (state, a metric); records each trace."""
  def step(state, batch):
    traces.append(1)
    return {"w": state["w"] * 2.0 + batch["x"].sum(0)}, batch["x"].mean()  # (4,), ()
  return step


def _toy_jitted(traces, devices):
  mesh = S.data_mesh(devices)
  state_sharding, batch_sharding = S.replicated(mesh), S.batch_sharding(mesh)
  jitted = jax.jit(_toy(traces), in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, state_sharding), donate_argnums=(0,))
  args = ({"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=state_sharding)},
          {"x": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=batch_sharding)})
  return jitted, args


# The toy's new state on `_toy_inputs`: w * 2 + the column sums of x (0..31 as (8, 4)).
TOY_NEW_W = np.arange(4) * 2.0 + np.array([112, 120, 128, 136])


def _toy_inputs(args):
  state = {"w": jax.device_put(np.arange(4, dtype=np.float32), args[0]["w"].sharding)}
  batch = {"x": jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4),
                               args[1]["x"].sharding)}
  return state, batch


@pytest.fixture
def empty_memory(monkeypatch):
  monkeypatch.setattr(executable_cache, "_in_memory", collections.OrderedDict())


def _written(cache_dir: pathlib.Path, name: str = "toy"):
  return sorted((cache_dir / executable_cache.SUBDIRECTORY).glob(f"{name}-*"))


def test_a_fresh_compile_is_written_and_read_back_without_tracing(fresh_compilation_cache,
                                                                   empty_memory):
  traces = []
  jitted, args = _toy_jitted(traces, jax.devices())  # 8 devices: the batch split over them
  compiled, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "compiled" and len(traces) == 1
  assert executable_cache.directory() == fresh_compilation_cache / "executables"
  assert len(_written(fresh_compilation_cache)) == 1
  again, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "memory" and again is compiled
  executable_cache._in_memory.clear()  # pylint: disable=protected-access  (as a new process)
  loaded, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "disk" and len(traces) == 1  # not traced again
  state, batch = _toy_inputs(args)
  want_state, want_mean = compiled(*_toy_inputs(args))
  got_state, got_mean = loaded(state, batch)
  np.testing.assert_array_equal(got_state["w"], want_state["w"])
  np.testing.assert_array_equal(got_state["w"], TOY_NEW_W)
  assert float(got_mean) == float(want_mean) == 15.5
  assert state["w"].is_deleted()  # the state is donated, as the compiled program says
  with pytest.raises(TypeError):
    loaded({"w": jnp.zeros((5,))}, batch)


def test_a_program_on_fewer_devices_loads_on_those_devices(fresh_compilation_cache,
                                                           empty_memory):
  traces = []
  jitted, args = _toy_jitted(traces, jax.devices()[2:4])
  executable_cache.load_or_compile("toy", jitted, args, description="v1")
  executable_cache._in_memory.clear()  # pylint: disable=protected-access
  loaded, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "disk"
  new_state, _ = loaded(*_toy_inputs(args))
  assert new_state["w"].sharding.device_set == set(jax.devices()[2:4])
  np.testing.assert_array_equal(new_state["w"], TOY_NEW_W)


def test_a_program_jax_read_back_from_its_cache_is_not_written(fresh_compilation_cache,
                                                               empty_memory):
  jitted, args = _toy_jitted([], jax.devices())
  executable_cache.load_or_compile("toy", jitted, args, description="v1")
  for path in _written(fresh_compilation_cache):
    path.unlink()  # as after a code edit: a new key, but jax's cache holds the program
  executable_cache._in_memory.clear()  # pylint: disable=protected-access
  jax.clear_caches()
  compiled, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "compiled" and not _written(fresh_compilation_cache)
  new_state, _ = compiled(*_toy_inputs(args))
  np.testing.assert_array_equal(new_state["w"], TOY_NEW_W)


def test_an_unreadable_file_is_reported_removed_and_compiled_again(fresh_compilation_cache,
                                                                   empty_memory):
  jitted, args = _toy_jitted([], jax.devices())
  executable_cache.load_or_compile("toy", jitted, args, description="v1")
  (path,) = _written(fresh_compilation_cache)
  assert path.stat().st_mode & 0o777 == 0o644
  path.write_bytes(path.read_bytes()[:100])  # truncated
  executable_cache._in_memory.clear()  # pylint: disable=protected-access
  messages = []
  compiled, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1",
                                                      log=messages.append)
  assert origin == "compiled"
  assert len(messages) == 1 and "cannot read the cached executable" in messages[0]
  assert str(path) in messages[0] and not path.exists()
  new_state, _ = compiled(*_toy_inputs(args))
  assert new_state["w"].shape == (4,)


def test_nothing_is_written_with_the_cache_off_or_several_processes(fresh_compilation_cache,
                                                                    empty_memory, monkeypatch):
  jitted, args = _toy_jitted([], jax.devices())
  monkeypatch.setattr(executable_cache, "directory", lambda: None)  # DERIS_JAX_CACHE=off
  _, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1")
  assert origin == "compiled" and not _written(fresh_compilation_cache)
  monkeypatch.undo()
  monkeypatch.setattr(executable_cache, "_in_memory", collections.OrderedDict())
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  _, origin = executable_cache.load_or_compile("toy", jitted, args, description="v2")
  assert origin == "compiled" and not _written(fresh_compilation_cache)


def test_the_key_changes_with_what_the_program_is_built_from(monkeypatch):
  _, args = _toy_jitted([], jax.devices())
  _, args_on_two = _toy_jitted([], jax.devices()[:2])
  _, args_on_other_two = _toy_jitted([], jax.devices()[2:4])

  def key(name="toy", description="v1", arguments=args, options=None):
    return executable_cache.program_key(name, description, arguments, options)

  base = key()
  assert key() == base and len(base) == 40
  wider = (args[0], {"x": jax.ShapeDtypeStruct((8, 5), jnp.float32,
                                               sharding=args[1]["x"].sharding)})
  half = ({"w": jax.ShapeDtypeStruct((4,), jnp.bfloat16, sharding=args[0]["w"].sharding)},
          args[1])
  renamed = ({"v": args[0]["w"]}, args[1])
  variants = [key(name="other"), key(description="v2"), key(arguments=wider),
              key(arguments=half), key(arguments=renamed), key(arguments=args_on_two),
              key(arguments=args_on_other_two), key(options={"xla_cpu_use_thunk_runtime": "1"})]
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_to=/x")
  variants.append(key())
  monkeypatch.undo()
  with jax.default_matmul_precision("highest"):
    variants.append(key())
  monkeypatch.setattr(executable_cache, "package_digest", lambda: "edited")
  variants.append(key())
  assert len(set(variants + [base])) == len(variants) + 1


def test_descriptions_leave_out_memory_addresses():
  def make():
    def fn(x):
      return x
    return fn
  first, second = make(), make()
  assert repr(first) != repr(second)  # "... at 0x7f..."
  assert executable_cache.stable_repr([first]) == executable_cache.stable_repr([second])


def test_the_package_digest_reads_every_source_file(tmp_path, monkeypatch):
  (tmp_path / "sub").mkdir()
  (tmp_path / "a.py").write_text("x = 1\n")
  (tmp_path / "sub" / "b.py").write_text("y = 2\n")
  monkeypatch.setattr(executable_cache, "_PACKAGE", tmp_path)
  try:
    digests = []
    for edit in (None, lambda: (tmp_path / "sub" / "b.py").write_text("y = 3\n"),
                 lambda: (tmp_path / "notes.txt").write_text("not source\n"),
                 lambda: (tmp_path / "sub" / "c.py").write_text("")):
      if edit:
        edit()
      executable_cache.package_digest.cache_clear()
      digests.append(executable_cache.package_digest())
    assert digests[0] != digests[1] == digests[2] != digests[3]
  finally:
    executable_cache.package_digest.cache_clear()


def test_old_files_are_pruned_least_recently_used_first(tmp_path):
  for i in range(6):
    path = tmp_path / f"toy-{i}{executable_cache.SUFFIX}"
    path.write_bytes(b"")
    os.utime(path, (1000 + i, 1000 + i))
  (tmp_path / f"other-0{executable_cache.SUFFIX}").write_bytes(b"")
  os.utime(tmp_path / f"toy-0{executable_cache.SUFFIX}", (2000, 2000))  # read back lately
  executable_cache._prune(tmp_path, "toy", keep=4)  # pylint: disable=protected-access
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      [f"{n}{executable_cache.SUFFIX}" for n in ("toy-0", "toy-3", "toy-4", "toy-5", "other-0")])



def test_a_program_that_cannot_be_written_is_still_returned(fresh_compilation_cache,
                                                            empty_memory, monkeypatch):
  def refuse(path, compiled):
    raise AttributeError("this jax's executables have no '_unloaded_executable'")
  monkeypatch.setattr(executable_cache, "_write", refuse)
  jitted, args = _toy_jitted([], jax.devices())
  messages = []
  compiled, origin = executable_cache.load_or_compile("toy", jitted, args, description="v1",
                                                      log=messages.append)
  assert origin == "compiled" and not _written(fresh_compilation_cache)
  assert messages == ["warning: the compiled toy is not cached on disk (AttributeError: this "
                      "jax's executables have no '_unloaded_executable')"]
  new_state, _ = compiled(*_toy_inputs(args))
  assert new_state["w"].shape == (4,)


def test_the_device_order_is_read_under_either_name_jax_has_used():
  devices = jax.devices()[3:5]
  for name in ("device_list", "device_assignment"):
    unloaded = type("Unloaded", (), {name: devices})()
    compiled = type("Compiled", (), {"_executable": type("E", (), {
        "_unloaded_executable": unloaded})()})()
    assert executable_cache._device_ids(compiled) == (3, 4)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="which devices"):
    executable_cache._device_ids(type("C", (), {"_executable": None})())  # pylint: disable=protected-access
