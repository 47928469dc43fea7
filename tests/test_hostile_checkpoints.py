"""Saves and loads under attack and accident (issue 15): adapter names that are paths, concurrent and killed saves,
full disks, and checkpoint folders edited to reach outside themselves, unpickle, or hang. Each is refused with a
CheckpointError (or InvalidOptionError) and leaves every file as it was."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import qadapt
from qadapt.checkpoint.files import sha256
from qadapt.testing import toy

from .conftest import backend_ready
from .hostile_support import tree

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=128)


def small_lora(seed=0, **options):
    return qadapt.attach(toy.build_model(seed=seed, **SMALL), "lora", r=2, **options)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A full-precision LoRA checkpoint (the layout every backend's checkpoint has)."""
    return qadapt.save(small_lora(init_lora_weights=False), tmp_path_factory.mktemp("hostile") / "saved")


def edited(saved, tmp_path, edit):
    """A copy of ``saved`` with ``edit(folder, manifest)`` applied; the manifest it returns is written back."""
    folder = shutil.copytree(saved, tmp_path / "copy")
    manifest_path = os.path.join(folder, "qadapt.json")
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    manifest = edit(folder, manifest)
    if manifest is not None:
        with open(manifest_path, "w") as handle:
            json.dump(manifest, handle)
    return folder


def refused(path, match):
    before = tree(path)
    with pytest.raises(qadapt.CheckpointError, match=match):
        qadapt.load(path)
    assert tree(path) == before


# ------------------------------------------------------------------------------------------------ adapter names
def test_an_adapter_name_that_is_a_path_never_reaches_the_file_system(tmp_path):
    """Was: the user's folder was removed and its files moved into out/adapter/ (issue 15, 1)."""
    victim = tmp_path / "user-folder"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    model = toy.build_model(**SMALL)
    for name in (str(victim), "../x", "", "a.b", ".", "a/b", 5, None):
        with pytest.raises(qadapt.InvalidOptionError, match="plain name"):
            qadapt.attach(model, "lora", adapter_name=name)
    assert (victim / "precious.txt").read_text() == "mine"
    assert not any("lora" in name for name, _ in model.named_modules())


def test_save_refuses_a_record_whose_adapter_name_is_a_path(tmp_path):
    """Defence in depth: an adapter name PEFT would join into a path (set by hand, past attach's check) is refused
    before any file is written."""
    model = small_lora()
    model.peft_config["../elsewhere"] = model.peft_config["default"]
    with pytest.raises(qadapt.InvalidOptionError, match="plain name"):
        qadapt.save(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []


def test_a_named_adapter_is_saved_and_reloaded(tmp_path):
    model = qadapt.attach(toy.build_model(**SMALL), "lora", r=2, adapter_name="mine-2")
    path = qadapt.save(model, tmp_path / "out")
    assert json.load(open(os.path.join(path, "qadapt.json")))["adapter"]["name"] == "mine-2"
    assert os.path.exists(os.path.join(path, "adapter", "adapter_model.safetensors"))
    assert isinstance(qadapt.load(path), torch.nn.Module)


# ------------------------------------------------------------------------------------------------ saving
def test_a_save_while_another_holds_the_path_is_refused_and_the_first_one_wins(tmp_path, monkeypatch):
    """Was: both concurrent saves to a new path succeeded, the second replacing the first (issue 15, 3). The second
    save here starts while the first is writing its base (deterministically: from inside the first)."""
    from qadapt.unquantized import UNQUANTIZED

    target, inner_error = tmp_path / "race", []
    first, second = small_lora(seed=1), small_lora(seed=2)
    original = type(UNQUANTIZED).save

    def save_and_race(self, model, path, options):
        if not inner_error:
            with pytest.raises(qadapt.CheckpointError, match="another save to this path is in progress") as raised:
                qadapt.save(second, target)
            inner_error.append(raised.value)
        original(self, model, path, options)

    monkeypatch.setattr(type(UNQUANTIZED), "save", save_and_race)
    qadapt.save(first, target)
    assert inner_error
    monkeypatch.undo()
    reloaded = qadapt.load(target)
    expected = first.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(reloaded.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, expected)
    assert sorted(os.listdir(tmp_path)) == ["race"]


def test_a_claim_held_by_another_process_is_refused_and_a_dead_ones_is_taken_over(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from qadapt.checkpoint.files import SaveTarget
        with SaveTarget({str(tmp_path / 'out')!r}, "test") as target:
            print("claimed", flush=True)
            sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(qadapt.CheckpointError, match="another save to this path is in progress"):
            qadapt.save(small_lora(), tmp_path / "out")
    finally:
        holder.kill()  # SIGKILL: the lock file stays, its flock goes with the process
        holder.wait()
    assert os.path.exists(tmp_path / ".out.qadapt-lock")
    qadapt.save(small_lora(), tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["out"]


KILL_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    import qadapt
    from qadapt.testing import toy

    small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    old = qadapt.attach(toy.build_model(seed=1, **small), "lora", r=2, init_lora_weights=False)
    new = qadapt.attach(toy.build_model(seed=2, **small), "lora", r=2, init_lora_weights=False)
    ids = torch.arange(16).view(1, -1)
    outputs = {}
    for label, model in (("old", old), ("new", new)):
        with torch.no_grad():
            outputs[label] = model(input_ids=ids).logits

    def killed_at(kill):
        # The child saves `new` over `old` and SIGKILLs itself at the kill point: the n-th Python call or C call
        # ("event"), or right after its n-th rename of a path of the checkpoint ("rename").
        kind, n = kill
        calls = [0]
        if kind == "rename":
            real = os.rename
            def rename(src, dst, *args, **kwargs):
                real(src, dst, *args, **kwargs)
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            os.rename = rename
        else:
            def profile(frame, event, arg):
                calls[0] += 1
                if calls[0] == n:
                    os.kill(os.getpid(), signal.SIGKILL)
            sys.setprofile(profile)
        qadapt.save(new, target, overwrite=True)
        sys.setprofile(None)
        os._exit(0)

    def count_events(path):
        calls = [0]
        def profile(frame, event, arg):
            calls[0] += 1
        sys.setprofile(profile)
        qadapt.save(new, path, overwrite=True)
        sys.setprofile(None)
        return calls[0]

    root, rounds = sys.argv[1], int(sys.argv[2])
    os.makedirs(os.path.join(root, "dry"))
    qadapt.save(old, os.path.join(root, "dry", "ckpt"))
    events = count_events(os.path.join(root, "dry", "ckpt"))
    kills = [("rename", 1), ("rename", 2)] + [("event", events * (i + 1) // (rounds - 1)) for i in range(rounds - 2)]
    results = []
    for index, kill in enumerate(kills):
        folder = os.path.join(root, f"round{index}")
        os.makedirs(folder)
        target = os.path.join(folder, "ckpt")
        qadapt.save(old, target)
        pid = os.fork()
        if pid == 0:
            killed_at(kill)
        _, status = os.waitpid(pid, 0)
        left = sorted(os.listdir(folder))
        loaded = qadapt.load(target)  # recovers what the kill left, then verifies every file
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        which = [label for label, expected in outputs.items() if torch.allclose(logits, expected, atol=1e-5)]
        marker = os.path.exists(os.path.join(target, ".qadapt-staging"))
        qadapt.save(new, target, overwrite=True)
        results.append({"kill": kill, "killed": os.WIFSIGNALED(status), "left": left, "loaded": which,
                        "marker": marker, "after": sorted(os.listdir(folder))})
    print(json.dumps(results))
""")


def test_saves_killed_at_any_point_leave_the_old_or_the_new_checkpoint_and_are_cleaned_up(tmp_path):
    """Ten saves killed with SIGKILL: right after each of the two renames of an overwrite (was: nothing left at the
    path, issue 15, 6) and at eight points spread over the whole save. The next load finds the old or the new
    checkpoint, complete; the next save leaves nothing beside it (no staging folder, backup or lock)."""
    result = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), "10"], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(rounds) == 10
    for outcome in rounds:
        assert outcome["loaded"] in (["old"], ["new"]), outcome
        assert outcome["after"] == ["ckpt"] and not outcome["marker"], outcome
    between_renames = rounds[0]
    assert between_renames["killed"] and "ckpt" not in between_renames["left"]  # the window that lost the checkpoint
    assert between_renames["loaded"] == ["old"]
    assert sum(outcome["killed"] for outcome in rounds) >= 8


def test_stale_staging_folders_are_removed_only_when_provably_qadapts(tmp_path):
    saved_path = tmp_path / "out"
    qadapt.save(small_lora(), saved_path)
    stale = tmp_path / ".out.abc123.partial"
    stale.mkdir()
    (stale / ".qadapt-staging").write_text(json.dumps({"target": str(saved_path), "pid": 999999}))
    (stale / "junk").write_text("x")
    foreign = tmp_path / ".out.mine.partial"  # the user's own, without qadapt's marker
    foreign.mkdir()
    (foreign / "notes").write_text("keep")
    other_target = tmp_path / ".out.xyz.partial"  # qadapt's, but for another path
    other_target.mkdir()
    (other_target / ".qadapt-staging").write_text(json.dumps({"target": str(tmp_path / "elsewhere")}))
    qadapt.save(small_lora(), saved_path, overwrite=True)
    assert not stale.exists()
    assert (foreign / "notes").read_text() == "keep" and other_target.exists()


@pytest.mark.parametrize("kind", ["file", "symlink", "dangling symlink"])
def test_overwriting_a_file_or_symlink_leaves_no_backup_and_never_follows_the_link(tmp_path, kind):
    """Was: a `.partial.old` backup stayed beside a file or symlink target (issue 15, 6)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    target = tmp_path / "target"
    if kind == "file":
        target.write_text("old")
    else:
        os.symlink(elsewhere if kind == "symlink" else tmp_path / "missing", target)
    with pytest.raises(qadapt.CheckpointError, match="overwrite=True"):
        qadapt.save(small_lora(), target)  # a symlink is never "empty", even a dangling one
    qadapt.save(small_lora(), target, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere", "target"]
    assert os.path.isdir(target) and not os.path.islink(target)
    assert (elsewhere / "keep.txt").read_text() == "keep"


def test_a_full_disk_is_a_checkpoint_error_and_leaves_nothing(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, lifted again after) makes the weights' write fail as on a full disk; safetensors
    reports it as its own error, not an OSError."""
    import resource
    import signal

    model = small_lora()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, limits[1]))
    try:
        with pytest.raises(qadapt.CheckpointError, match="writing failed"):
            qadapt.save(model, tmp_path / "out")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert os.listdir(tmp_path) == []


def test_a_read_only_folder_is_a_checkpoint_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    with pytest.raises(qadapt.CheckpointError, match="read-only file system"):
        qadapt.save(small_lora(), tmp_path / "out")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------ loading
def _list(folder, manifest, name):
    full = os.path.join(folder, name)
    manifest["files"][name] = sha256(full)
    manifest["sizes"][name] = os.path.getsize(full)
    return manifest


def test_pickle_weights_are_never_loaded_even_when_listed(saved, tmp_path, monkeypatch):
    """Was: adapter_model.bin / pytorch_model.bin listed in qadapt.json went through torch.load (issue 15, 7)."""
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))

    def swap_adapter(folder, manifest):
        os.remove(os.path.join(folder, "adapter", "adapter_model.safetensors"))
        for key in ("files", "sizes"):
            del manifest[key]["adapter/adapter_model.safetensors"]
        torch.save({"x": torch.zeros(1)}, os.path.join(folder, "adapter", "adapter_model.bin"))
        return _list(folder, manifest, "adapter/adapter_model.bin")

    refused(edited(saved, tmp_path / "a", swap_adapter), "not a safetensors file")

    def pickle_disguised(folder, manifest):  # a pickle under a safe name is found by its header
        torch.save({"x": torch.zeros(1)}, os.path.join(folder, "base", "extra.safetensors"))
        return _list(folder, manifest, "base/extra.safetensors")

    refused(edited(saved, tmp_path / "b", pickle_disguised), "not a safetensors file")

    def unlisted(folder, manifest):  # transformers would pick it up by name
        with open(os.path.join(folder, "base", "pytorch_model.bin"), "wb") as handle:
            handle.write(b"\x80\x04junk")
        return manifest

    refused(edited(saved, tmp_path / "c", unlisted), "not a safetensors file")
    assert loads == []


@pytest.mark.parametrize("name", ["../outside/x", "/etc/hostname", "base/../../outside/x", "base//config.json",
                                  "./qadapt.json"])
def test_manifest_paths_must_stay_inside_the_folder(saved, tmp_path, name):
    """Was: a `files` entry like ../outside/x was opened and hashed (issue 15, 7)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x").write_text("secret")

    def add(folder, manifest):
        manifest["files"][name] = "0" * 64
        manifest["sizes"][name] = 6
        return manifest

    refused(edited(saved, tmp_path, add), "not a plain path inside the folder")


def test_symlinks_fifos_and_devices_are_refused_without_reading_them(saved, tmp_path):
    """Was: a FIFO, /dev/zero or a symlink to one made qadapt.load hang forever; a symlinked base/ was followed."""
    def fifo(folder, manifest):
        os.mkfifo(os.path.join(folder, "base", "weights"))
        manifest["files"]["base/weights"] = "0" * 64
        manifest["sizes"]["base/weights"] = 0
        return manifest

    refused(edited(saved, tmp_path / "fifo", fifo), "not a regular file")

    def dev_zero(folder, manifest):
        weights = os.path.join(folder, "base", "model.safetensors")
        os.remove(weights)
        os.symlink("/dev/zero", weights)
        return manifest

    refused(edited(saved, tmp_path / "zero", dev_zero), "symbolic link")

    def linked_base(folder, manifest):
        shutil.rmtree(os.path.join(folder, "base"))
        os.symlink(os.path.join(saved, "base"), os.path.join(folder, "base"))
        return manifest

    refused(edited(saved, tmp_path / "base", linked_base), "base is a symbolic link")

    def unlisted_fifo(folder, manifest):
        os.mkfifo(os.path.join(folder, "adapter", "pipe"))
        return manifest

    refused(edited(saved, tmp_path / "pipe", unlisted_fifo), "not a regular file")


def test_a_file_whose_size_differs_is_refused_before_it_is_read(saved, tmp_path, monkeypatch):
    import qadapt.checkpoint.manifest as manifest_module

    def grow(folder, manifest):
        with open(os.path.join(folder, "base", "model.safetensors"), "ab") as handle:
            handle.write(b"\0" * 10)
        return manifest

    path = edited(saved, tmp_path, grow)
    hashed = []
    monkeypatch.setattr(manifest_module, "sha256", lambda *a, **k: hashed.append(a[0]) or sha256(*a, **k))
    with pytest.raises(qadapt.CheckpointError, match="base/model.safetensors has .* bytes where qadapt.json records"):
        qadapt.load(path)
    assert not [name for name in hashed if name.endswith(os.path.join("base", "model.safetensors"))]


@pytest.mark.parametrize("edit, match", [
    (lambda m: [1, 2], "JSON list, not an object"),
    (lambda m: "text", "JSON str, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "backend"}, "'backend' is missing"),
    (lambda m: {**m, "backend": "bnb"}, "'backend' is missing or not an object"),
    (lambda m: {**m, "backend": {**m["backend"], "name": 5}}, "'backend.name'"),
    (lambda m: {**m, "backend": {**m["backend"], "options": [1]}}, "'backend.options'"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, "'files' is missing or empty"),
    (lambda m: {**m, "files": {}}, "'files' is missing or empty"),
    (lambda m: {**m, "files": {k: 5 for k in m["files"]}}, "SHA-256"),
    (lambda m: {**m, "sizes": {k: -1 for k in m["sizes"]}}, "'sizes'"),
    (lambda m: {**m, "format": True}, "unknown checkpoint format"),
    (lambda m: {**m, "format": 2}, "unknown checkpoint format"),
    (lambda m: {**m, "adapter": {"method": "lora", "name": "../x"}}, "'adapter.name'"),
    (lambda m: {**m, "adapter": {"method": "nope", "name": "default"}}, "'adapter' is neither"),
    (lambda m: {k: v for k, v in m.items() if k != "adapter"}, "'adapter' is missing"),
    (lambda m: {**m, "merged": {"method": "lora", "strategy": "requantize"}}, "both set"),
], ids=["list", "string", "no-backend", "backend-string", "backend-name", "options", "no-files", "empty-files",
        "digests", "sizes", "format-bool", "format-2", "adapter-name", "adapter-method", "no-adapter-key", "merged"])
def test_a_manifest_breaking_the_schema_is_refused(saved, tmp_path, edit, match):
    """Was: AttributeError / KeyError for a qadapt.json of the wrong JSON type or missing keys, and a manifest
    without `files` loaded unverified (issue 15, 11 and 12)."""
    refused(edited(saved, tmp_path, lambda folder, manifest: edit(manifest)), match)


def test_adapter_null_with_an_adapter_folder_is_refused(saved, tmp_path):
    """Was: `adapter: null` silently dropped the adapter/ that was there (issue 15, 12)."""
    def drop(folder, manifest):
        manifest["adapter"] = None
        return manifest

    refused(edited(saved, tmp_path, drop), "records no adapter but the folder holds adapter/")


def test_the_keys_of_multi_adapter_and_sharded_checkpoints_are_checked(saved, tmp_path, tiny_dir):
    """The manifest keys of issues 13 and 17: an adapter's folder must be adapter/ or adapter/<its name>; a sharded
    run's base_source must be a folder with safetensors weights, its files inside it, and no base/ beside it."""
    from qadapt.checkpoint.source import load_source

    def outside(folder, manifest):
        manifest["adapters"]["default"]["dir"] = "../elsewhere"
        return manifest

    refused(edited(saved, tmp_path / "a", outside), "'adapters' entry 'default' is not a plain name")

    def both(folder, manifest):
        manifest["base_source"] = {"path": str(tiny_dir), "files": {}}
        return manifest

    refused(edited(saved, tmp_path / "b", both), "names a base_source folder but the checkpoint holds base/ too")
    hqq = qadapt.get_backend("hqq")
    with pytest.raises(qadapt.CheckpointError, match="outside its folder"):
        load_source("ckpt", {"path": str(tiny_dir), "files": {"../../etc/hostname": "0" * 64}}, hqq, {})
    with pytest.raises(qadapt.InvalidOptionError, match="no safetensors weights|no config.json"):
        load_source("ckpt", {"path": str(tmp_path), "files": {}}, hqq, {})


def test_only_a_folder_with_qadapt_json_is_a_checkpoint(saved, tmp_path, tiny_dir):
    """Was: any folder with a base/ sub-folder was taken for a checkpoint (issue 15, 12)."""
    from qadapt.checkpoint import is_checkpoint

    folder = tmp_path / "plain"
    shutil.copytree(tiny_dir, folder)
    (folder / "base").mkdir()  # a model folder that happens to hold a base/ folder
    assert not is_checkpoint(folder) and is_checkpoint(saved)
    with pytest.raises(qadapt.CheckpointError, match="qadapt.json is missing"):
        qadapt.load(folder)  # without a backend: a checkpoint missing its manifest, said so


def test_a_manifest_naming_the_wrong_backend_is_refused_after_loading(tiny_dir, tmp_path):
    """Was: an hqq checkpoint whose qadapt.json says bnb loaded bnb's random-initialised layers with a warning
    about missing keys (issue 15, 9)."""
    backend_ready("hqq")
    backend_ready("bnb")
    path = qadapt.save(qadapt.load(tiny_dir, backend="hqq"), tmp_path / "hqq")
    with open(os.path.join(path, "qadapt.json")) as handle:
        manifest = json.load(handle)
    manifest["backend"].update(name="bnb", options=qadapt.get_backend("bnb").validate_options({}))
    with open(os.path.join(path, "qadapt.json"), "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(qadapt.CheckpointError, match="names the wrong backend"):
        qadapt.load(path)


def test_recorded_options_a_backend_refuses_are_refused(saved, tmp_path):
    def options(folder, manifest):
        manifest["backend"]["options"] = {"bits": 3}
        return manifest

    refused(edited(saved, tmp_path, options), "records options")
