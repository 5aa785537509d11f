"""An ``apptainer exec`` for the tests, built on bubblewrap, and the test image it runs.

Apptainer cannot be installed on the test machines; bubblewrap (``bwrap``) can. This
runtime takes the command lines the dispatcher writes (``apptainer exec [--nv]
--containall --cleanenv --bind SRC[:DST[:ro|rw]],... --env K=V,... IMAGE CMD...``, also
``apptainer test IMAGE``) and runs them the way Apptainer would, in a fresh mount
namespace that holds only:

* the image: its root directory read-only, plus the host directories the image stands
  for (``/usr`` as the image's operating system, the project venv's site-packages as
  ``/opt/deps``), read-only; ``/`` itself is read-only, as a SIF's squashfs is;
* ``/proc``, ``/sys`` (read-only), a minimal ``/dev`` (null, zero, random, urandom,
  tty, pts, shm) and the files Apptainer binds by default: ``/etc/passwd``,
  ``/etc/group``, ``/etc/hosts``, ``/etc/resolv.conf``, ``/etc/localtime``;
* the declared binds, at their declared destinations (applied last, so a bind below
  ``/tmp`` shows on top of the private one), read-only when asked (``:ro``);
* with ``--contain``/``--containall``: a private ``/tmp`` and ``/var/tmp`` (tmpfs) and an
  empty ``$HOME`` (tmpfs), and the command starts in that ``$HOME``; without them the
  host's ``$HOME``, working directory, ``/tmp`` and ``/var/tmp`` are bound, as Apptainer
  does by default.

``--containall`` also gives the command its own PID and IPC namespaces
(``--unshare-pid --unshare-ipc``); the runtime forwards SIGTERM, SIGINT, SIGHUP,
SIGUSR1 and SIGUSR2 to it (Apptainer's starter and its ``sinit`` shim do the same), so
a unit asked to stop by submitit can save a checkpoint and exit 75. The network is
shared (Apptainer's default: Dask workers must reach their scheduler).

The environment follows Apptainer's documented order ("Environment and Metadata" in the
Apptainer user guide): with ``--cleanenv`` it starts from ``HOME``, ``LANG=C``, the
default ``PATH``, ``LD_LIBRARY_PATH=/.singularity.d/libs``, ``PS1``, ``TERM`` (when set)
and the ``APPTAINER_*`` runtime variables, without it from the host environment; then
the image's environment scripts ``/.singularity.d/env/*.sh`` are sourced in order (the
base image's ``ENV`` as ``10-docker2singularity.sh``, the definition file's
``%environment`` verbatim as ``90-environment.sh``), seeing the ``--env`` values; then
``--env`` and ``APPTAINERENV_*`` values are applied on top.

**The image.** No SIF can be built here, so ``IMAGE.sif`` is a small JSON manifest
(the dispatcher only checks that the file exists): ``{"root": "<dir>", "host":
{"/usr": "/usr", "/opt/deps": "<site-packages>"}}``; ``root`` (by default
``IMAGE.sif.root/`` next to it) is the image's root directory and ``host`` the host
directories bound read-only at those image paths. :func:`build_image` makes one, the way
``apptainer build`` would from ``containers/toolkit.def``: ``/opt/venv`` is a venv whose
Python is the operating system's ``/usr/bin/python3``, with the toolkit wheel installed
non-editably (by pip, inside a sandbox where ``/opt`` is writable, so the scripts'
``#!`` lines say ``/opt/venv/bin/python``) and its dependencies from ``/opt/deps``
through a ``.pth`` line; the definition's ``%environment``, ``%runscript`` and ``%test``
go to ``/.singularity.d/`` as Apptainer stores them. The checkout and the project venv
are not in the image: a job that needs them fails, as it would on a cluster.

Use from a test: ``build_image(tmp / "toolkit.sif", wheel)``, then
``write_runtime(bin_dir, log)`` and put ``bin_dir`` first on ``PATH``. Each call is
appended to ``log`` as a JSON line (``argv``, ``nv``, ``binds``, ``env``).

**The stand-in.** Where no isolation is needed (or bwrap cannot run), ``write_standin(bin_dir,
log)`` puts a lighter ``apptainer`` there: it reads the same command line with the same
parser (:func:`parse`), checks what the dispatcher must pass (``exec --containall
--cleanenv``, binds whose sources exist, an existing ``.sif``, every absolute path of the
command inside a bind, the container's ``python``), logs the call the same way, and runs
the command with a clean environment plus the image's ``%environment`` values on the host,
without hiding the host's files. Any file ending in ``.sif`` will do as its image.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

BWRAP = "/usr/bin/bwrap"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""Apptainer's default ``PATH`` in a container."""
IMAGE_PATH = "/opt/venv/bin:" + DEFAULT_PATH
"""The base image's ``PATH`` (the PyTorch image puts its Python first the same way)."""
HOST_ETC = ("passwd", "group", "hosts", "resolv.conf", "localtime")
"""Host files Apptainer binds into every container (apptainer.conf defaults)."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
DEPS = "/opt/deps"


class UsageError(Exception):
    """A command line the real apptainer would refuse."""


@functools.cache
def available() -> str | None:
    """``None`` when bwrap can make a sandbox here, else why not."""
    if not Path(BWRAP).exists():
        return f"{BWRAP} is not installed (apt-get install bubblewrap)"
    out = subprocess.run([BWRAP, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-ipc", "--dev", "/dev",
                          "--proc", "/proc", "true"], capture_output=True, text=True)
    return None if out.returncode == 0 else f"bwrap cannot create a sandbox here: {out.stderr.strip()}"


# --------------------------------------------------------------------------- the definition file


def def_sections(text: str) -> dict[str, str]:
    """``%name`` -> body of an Apptainer definition file, plus ``header``."""
    out: dict[str, list[str]] = {"header": []}
    current = "header"
    for line in text.splitlines():
        m = re.match(r"^%(\w+)\s*$", line)
        if m:
            current = m.group(1)
            out[current] = []
        else:
            out[current].append(line)
    return {k: textwrap.dedent("\n".join(v)).strip("\n") + "\n" for k, v in out.items()}


# --------------------------------------------------------------------------- the image


def _host_os(root: Path, host: dict[str, str]) -> None:
    """The image's operating system: the host's /usr, read-only, with its /bin, /lib... links."""
    host["/usr"] = "/usr"
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            (root / name).symlink_to(os.readlink(path))
        elif path.is_dir():
            host[f"/{name}"] = str(path)
    etc = root / "etc"
    etc.mkdir()
    for name in ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "nsswitch.conf", "alternatives", "os-release"):
        src = Path("/etc") / name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, etc / name, symlinks=True)
        elif src.exists() or src.is_symlink():
            shutil.copy2(src, etc / name, follow_symlinks=False)
    for name in HOST_ETC:  # mount points for the files bound at run time
        (etc / name).touch()
    for name in ("tmp", "var/tmp", "home", "root", "proc", "sys", "dev"):
        (root / name).mkdir(parents=True, exist_ok=True)


def _sandbox_build(root: Path, host: dict[str, str], wheel: Path) -> None:
    """``%post``: make /opt/venv and install the wheel, inside the image with /opt writable."""
    mounts = [a for dst, src in host.items() for a in ("--ro-bind", src, dst)]
    mounts += [a for p in sorted(root.iterdir()) if p.is_symlink() for a in ("--symlink", os.readlink(p), f"/{p.name}")]
    script = textwrap.dedent(f"""\
        set -eu
        /usr/bin/python3 -m venv --without-pip /opt/venv
        site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        echo {DEPS} > "$site/image_deps.pth"
        /opt/venv/bin/python -m pip install -q --no-deps --no-index --no-cache-dir /wheels/{wheel.name}
        """)
    argv = [BWRAP, "--die-with-parent", *mounts, "--bind", str(root / "opt"), "/opt",
            "--ro-bind", host[DEPS], DEPS, "--ro-bind", str(wheel.parent), "/wheels",
            "--ro-bind", str(root / "etc"), "/etc", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--chdir", "/tmp", "/bin/sh", "-c", script]
    env = {"PATH": DEFAULT_PATH, "HOME": "/tmp", "LANG": "C.UTF-8", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"building the test image failed ({out.returncode}): {out.stderr[-3000:]}")


def build_image(sif: Path, wheel: Path, definition: Path, deps: str) -> Path:
    """Make ``sif`` (the manifest) and ``sif.root/`` (the image) from a definition file.

    Parameters
    ----------
    sif
        Where the manifest goes; the image root is ``<sif>.root`` next to it.
    wheel
        The toolkit wheel, installed non-editably into ``/opt/venv``.
    definition
        ``containers/toolkit.def``: its ``%environment``, ``%runscript`` and ``%test``.
    deps
        Host folder of the dependencies (the project venv's site-packages), bound
        read-only at ``/opt/deps`` and put on ``sys.path`` by a ``.pth`` line.
    """
    root = sif.with_name(sif.name + ".root")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    host: dict[str, str] = {}
    _host_os(root, host)
    (root / "opt" / "deps").mkdir(parents=True)
    host[DEPS] = str(Path(deps).resolve())
    _sandbox_build(root, host, wheel)
    parts = def_sections(definition.read_text())
    meta = root / ".singularity.d"
    (meta / "env").mkdir(parents=True)
    (meta / "libs").mkdir()
    (meta / "env" / "10-docker2singularity.sh").write_text(f'#!/bin/sh\nexport PATH="{IMAGE_PATH}"\n')
    (meta / "env" / "90-environment.sh").write_text("#!/bin/sh\n" + parts["environment"])
    for name in ("runscript", "test"):
        (meta / name).write_text("#!/bin/sh\n\n" + parts[name])
        (meta / name).chmod(0o755)
    shutil.copy2(definition, meta / "Singularity")
    sif.write_text(json.dumps({"root": str(root), "host": host}, indent=1) + "\n")
    return sif


# --------------------------------------------------------------------------- the runtime


def _write_launcher(folder: Path, name: str, call: str) -> Path:
    """An executable ``folder/name`` that imports this module and exits with ``call``'s value."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n"
                    "import sys\n"
                    f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                    "import apptainer_bwrap\n"
                    f"raise SystemExit(apptainer_bwrap.{call})\n")
    path.chmod(0o755)
    return path


def write_runtime(folder: Path, log: Path, name: str = "apptainer") -> Path:
    """Put an executable ``apptainer`` in ``folder`` that runs :func:`main` (prepend it to PATH)."""
    return _write_launcher(folder, name, f"main(sys.argv[1:], log={str(log)!r})")


def write_standin(folder: Path, log: Path) -> Path:
    """Put the stand-in ``apptainer`` in ``folder`` that runs :func:`standin_main` (prepend it to PATH)."""
    return _write_launcher(folder, "apptainer", f"standin_main(sys.argv[1:], log={str(log)!r})")


def _split_csv(value: str) -> list[str]:
    """A comma-separated flag value, quoted fields allowed (pflag's string slices)."""
    return [field for row in csv.reader([value]) for field in row if field]


def parse(argv: list[str]) -> dict[str, Any]:
    """``[exec|test] [flags] IMAGE [CMD...]`` as Apptainer's CLI reads it (flags stop at IMAGE).

    Raises
    ------
    UsageError
        An unknown command or flag, a flag without its value, a bad ``--env``, no image.
    """
    if not argv or argv[0] not in ("exec", "test"):
        raise UsageError(f"unknown command {argv[:1]!r}: this runtime runs 'exec' and 'test'")
    opts: dict[str, Any] = {"command": argv[0], "nv": False, "contain": False, "cleanenv": False,
                            "pid": False, "ipc": False, "binds": [], "env": {}}
    args = argv[1:]
    while args and args[0].startswith("-"):
        flag, eq, value = args[0].partition("=")
        args = args[1:]
        if flag in ("--nv",):
            opts["nv"] = True
        elif flag in ("-C", "--containall"):
            opts.update(contain=True, cleanenv=True, pid=True, ipc=True)
        elif flag in ("-c", "--contain"):
            opts["contain"] = True
        elif flag in ("-e", "--cleanenv"):
            opts["cleanenv"] = True
        elif flag in ("-p", "--pid"):
            opts["pid"] = True
        elif flag in ("-i", "--ipc"):
            opts["ipc"] = True
        elif flag in ("-B", "--bind", "--env"):
            if not eq:
                if not args:
                    raise UsageError(f"flag needs an argument: {flag}")
                value, args = args[0], args[1:]
            if flag == "--env":
                for item in _split_csv(value):
                    key, sep, val = item.partition("=")
                    if not sep or not key:
                        raise UsageError(f"--env {item!r} must be formatted as key=value")
                    opts["env"][key] = val
            else:
                opts["binds"] += _split_csv(value)
        else:
            raise UsageError(f"unknown flag: {flag}")
    if not args:
        raise UsageError("no image given")
    opts["image"], opts["cmd"] = args[0], args[1:]
    if opts["command"] == "exec" and not opts["cmd"]:
        raise UsageError("exec needs a command")
    return opts


def bind_spec(spec: str) -> tuple[str, str, str]:
    """``src[:dst[:ro|rw]]`` as (absolute source, destination, option); refuses a missing
    source like Apptainer."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise UsageError(f"bind {spec!r}: too many ':' (src[:dst[:opts]])")
    src = os.path.abspath(parts[0])
    dst = parts[1] if len(parts) > 1 and parts[1] else src
    opt = parts[2] if len(parts) > 2 else "rw"
    if opt not in ("ro", "rw"):
        raise UsageError(f"bind {spec!r}: unknown option {opt!r} (ro or rw)")
    if not os.path.exists(src):
        raise UsageError(f"container creation failed: mount {src}->{dst} error: mount source {src} doesn't exist")
    if not dst.startswith("/"):
        raise UsageError(f"bind {spec!r}: the destination must be an absolute path")
    return src, dst, opt


def _bind_args(spec: str) -> list[str]:
    """bwrap arguments for one ``src[:dst[:ro|rw]]``."""
    src, dst, opt = bind_spec(spec)
    return ["--ro-bind" if opt == "ro" else "--bind", src, dst]


def sandbox_argv(opts: dict[str, Any], manifest: dict[str, Any], host_env: dict[str, str]) -> list[str]:
    """The bwrap namespace and mount arguments, ending with the directory the command starts in."""
    root = Path(manifest["root"])
    home = host_env.get("HOME") or "/root"
    argv = [BWRAP, "--die-with-parent"]
    if opts["pid"]:
        argv.append("--unshare-pid")
    if opts["ipc"]:
        argv.append("--unshare-ipc")
    for entry in sorted(root.iterdir()):
        if entry.is_symlink():
            argv += ["--symlink", os.readlink(entry), f"/{entry.name}"]
        else:
            argv += ["--ro-bind", str(entry), f"/{entry.name}"]
    for dst, src in manifest["host"].items():
        argv += ["--ro-bind", src, dst]
    for name in HOST_ETC:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    argv += ["--proc", "/proc", "--ro-bind", "/sys", "/sys", "--dev", "/dev"]
    if opts["nv"]:  # what of the GPU exists here; the driver libraries are not simulated
        for dev in sorted(Path("/dev").glob("nvidia*")):
            argv += ["--dev-bind", str(dev), str(dev)]
    if opts["contain"]:
        argv += ["--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", home]
        cwd = home
    else:
        cwd = os.getcwd()
        for path in ("/tmp", "/var/tmp", home, cwd):
            if os.path.isdir(path):
                argv += ["--bind", path, path]
    for spec in opts["binds"]:
        argv += _bind_args(spec)
    return [*argv, "--remount-ro", "/", "--chdir", cwd]


def container_env(opts: dict[str, Any], host_env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(environment the command starts with, values applied after the image's scripts)."""
    user = {k.removeprefix("APPTAINERENV_"): v for k, v in host_env.items() if k.startswith("APPTAINERENV_")}
    user.update(opts["env"])
    image = os.path.abspath(opts["image"])
    if opts["cleanenv"]:
        env = {"HOME": host_env.get("HOME") or "/root", "LANG": "C", "PATH": DEFAULT_PATH}
        if "TERM" in host_env:
            env["TERM"] = host_env["TERM"]
    else:
        env = {k: v for k, v in host_env.items() if not k.startswith("APPTAINERENV_")}
        env["PATH"] = DEFAULT_PATH
    env.update({"LD_LIBRARY_PATH": "/.singularity.d/libs", "PS1": "Apptainer> ",
                "APPTAINER_COMMAND": opts["command"], "APPTAINER_CONTAINER": image,
                "APPTAINER_NAME": os.path.basename(image),
                "APPTAINER_ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
                "APPTAINER_BIND": ",".join(opts["binds"])})
    env.update(user)  # visible while the image's scripts run, and applied again after them
    return env, user


ACTION = """\
for f in /.singularity.d/env/*.sh; do [ -f "$f" ] && . "$f"; done
{exports}
exec "$@"
"""
"""What runs first in the container (Apptainer's /.singularity.d/actions/exec does the same)."""


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run(opts: dict[str, Any], host_env: dict[str, str]) -> int:
    """Run the parsed command in the sandbox; return its exit status."""
    image = Path(opts["image"])
    if not (image.name.endswith(".sif") and image.is_file()):
        raise UsageError(f"could not open image {image}: not a .sif file")
    try:
        manifest = json.loads(image.read_text())
    except ValueError as e:
        raise UsageError(f"{image} is not a test image manifest (tests/apptainer_bwrap.py): {e}") from e
    sandbox = sandbox_argv(opts, manifest, host_env)
    env, user = container_env(opts, host_env)
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in user.items())
    cmd = opts["cmd"] if opts["command"] == "exec" else ["/bin/sh", "/.singularity.d/test"]
    first: list[int] = []  # host PID of the sandbox's first process, once bwrap reports it

    def forward(signum: int, _frame: object) -> None:
        # With --pid the first process is bwrap's reaper (PID 1, which ignores signals):
        # the command is its child, as under Apptainer's sinit shim.
        targets = [c for pid in first for c in _children(pid)] if opts["pid"] else first
        for pid in targets or first:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    r, w = os.pipe()
    proc = subprocess.Popen([*sandbox, "--info-fd", str(w), "/bin/sh", "-c", ACTION.format(exports=exports),
                             "apptainer-action", *cmd], env=env, pass_fds=(w,))
    os.close(w)
    text = b""
    while chunk := os.read(r, 4096):  # bwrap writes one JSON object, then closes its end
        text += chunk
        try:
            first.append(int(json.loads(text)["child-pid"]))
            break
        except ValueError:
            continue
    os.close(r)
    return proc.wait()


def _log_call(log: str | None, argv: list[str], opts: dict[str, Any]) -> None:
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": argv, "nv": opts["nv"], "binds": opts["binds"],
                                "env": opts["env"]}) + "\n")


def main(argv: list[str], log: str | None = None) -> int:
    """The ``apptainer`` entry point: parse, log the call, run; 255 on a refused command line."""
    try:
        opts = parse(argv)
        _log_call(log, argv, opts)
        return run(opts, dict(os.environ))
    except UsageError as e:
        print(f"FATAL:   {e}", file=sys.stderr)
        return 255


# --------------------------------------------------------------------------- the stand-in


def standin_check(opts: dict[str, Any]) -> None:
    """What the stand-in asks of a parsed command line (see the module's docstring).

    Raises
    ------
    UsageError
        Anything but ``exec --containall --cleanenv`` with binds, a missing image or bind
        source, a path of the command outside every bind, another program than ``python``.
    """
    if opts["command"] != "exec":
        raise UsageError(f"expected 'exec', got {opts['command']!r}")
    if not (opts["contain"] and opts["cleanenv"] and opts["pid"] and opts["ipc"]):
        raise UsageError("expected --containall --cleanenv")
    if not opts["binds"]:
        raise UsageError("expected --bind")
    image = opts["image"]
    if not (image.endswith(".sif") and os.path.isfile(image)):
        raise UsageError(f"image {image} is not a SIF file")
    inside = [bind_spec(spec)[1] for spec in opts["binds"]]
    for arg in opts["cmd"]:
        if arg.startswith("/") and not any(arg == d or arg.startswith(d.rstrip("/") + "/") for d in inside):
            raise UsageError(f"{arg} would not be visible in the container (binds: {inside})")
    if opts["cmd"][:1] != ["python"]:
        raise UsageError(f"expected the container's python, got {opts['cmd'][:1]!r}")


def standin_main(argv: list[str], log: str | None = None) -> int:
    """The stand-in ``apptainer`` entry point: parse and check the command line, log the
    call, then run the command on the host the way ``apptainer exec --containall
    --cleanenv`` would set up its environment: a clean one plus the image's
    ``%environment`` values and the ``--env`` ones; 255 on a refused command line."""
    try:
        opts = parse(argv)
        standin_check(opts)
    except UsageError as e:
        print(f"apptainer stand-in: {e}", file=sys.stderr)
        return 255
    _log_call(log, argv, opts)
    python = sys.executable  # the launcher's: the project venv stands for the image's python
    scratch = opts["env"].get("TOOLKIT_SCRATCH", "/tmp")
    env = {"PATH": os.path.dirname(python) + ":/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1",
           "HF_HOME": scratch + "/hf", "TORCH_HOME": scratch + "/torch",
           "MPLCONFIGDIR": scratch + "/matplotlib", **opts["env"]}
    os.execve(python, [python, *opts["cmd"][1:]], env)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
