"""Applications in real containers (Podman, runc) with their own pcsc-lite, on sockets of
`pcsc-bridge local` (docs/containers.md).

The images are Debian 12, 13 and unstable roots (the matrix's chroots,
tests/matrix/pcsclite.py: pcscd's client library and pyscard in each) imported into
Podman without a registry, tagged with the chroot's build so that a chroot built anew (a
fresh cache, as in CI) is imported anew. Each container runs as it should in
production: no network, a read-only root, no capabilities, no new privileges, a non-root
user in a user namespace of its own (``--userns=auto``), and only its socket's folder
mounted, at /run/pcscd, where its library looks by default. `local` serves the host's
readers (the virtual backend, changed through its control socket while containers wait)
with a policy per socket.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matrix.pcsclite import chroot_dir, ensure_chroot
from targets import Process, wait_path

pytestmark = pytest.mark.matrix

RELEASES = ("bookworm", "trixie", "sid")    # Debian 12 (pcsc-lite 1.9.9), 13 (2.3.3), sid
R0, R2 = "Virtual PCD 00 00", "Virtual PCD 00 02"
REPO = "localhost/pcsc-bridge-test"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"   # for kube play too
HARDENED = ["--network=none", "--read-only", "--cap-drop=all",
            "--security-opt", "no-new-privileges", "--user", "1000:1000", "--userns=auto"]
# in the container: the readers, then an APDU to each (the virtual card echoes 80 EE)
LIST_AND_SEND = r"""
from smartcard import scard as s
hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
hr, readers = s.SCardListReaders(ctx, [])
print("readers", hr, readers)
for name in readers or ["Virtual PCD 00 00"]:
    hr, card, proto = s.SCardConnect(ctx, name, s.SCARD_SHARE_SHARED, s.SCARD_PROTOCOL_T1)
    got = s.SCardTransmit(card, proto, [0x80, 0xEE, 0, 0, 1, 0x5A]) if hr == 0 else (hr, [])
    print("connect", name, hr, "transmit", got[0], bytes(got[1]).hex())
"""
# in the container: wait for a reader to arrive (\\?PnP?\Notification), then list
WAIT_FOR_READER = r"""
from smartcard import scard as s
hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
pnp = "\\\\?PnP?\\Notification"
hr, st = s.SCardGetStatusChange(ctx, 0, [(pnp, s.SCARD_STATE_UNAWARE)])
print("waiting", flush=True)
hr, st = s.SCardGetStatusChange(ctx, 20000, [(pnp, st[0][1])])
print("woken", hr, s.SCardListReaders(ctx, [])[1], flush=True)
"""


def _run(argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)


@pytest.fixture(scope="module")
def podman(tmp_path_factory) -> dict:
    """The environment Podman runs with here: runc, and the limits this machine allows
    (crun and the default ulimits cannot start a container on it)."""
    if not shutil.which("podman") or not shutil.which("runc"):
        pytest.fail("podman and runc are not installed (scripts/setup installs them as "
                    "root)", pytrace=False)
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    hard = _run(["sh", "-c", "ulimit -Hn"]).stdout.strip()
    conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={hard}:{hard}", '
                    f'"nproc=32768:32768"]\n[engine]\nruntime = "runc"\n')
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def image(podman: dict, release: str) -> str:
    """The release's image, imported from its chroot if that build has none yet (older
    builds' images are removed)."""
    root = ensure_chroot(release)
    build = hashlib.sha256((root / "pcsc-bridge.json").read_bytes()).hexdigest()[:12]
    tag = f"{REPO}:{release}-{build}"
    if _run(["podman", "image", "exists", tag], env=podman).returncode != 0:
        old = _run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}",
                    "--filter", f"reference={REPO}:{release}-*"], env=podman).stdout.split()
        tar = subprocess.Popen(["tar", "-C", str(chroot_dir(release)), "-c", "."],
                               stdout=subprocess.PIPE)
        done = subprocess.run(["podman", "import", "--change", f"ENV=PATH={PATH}",
                               "--change", 'CMD=["/bin/bash"]', "-", tag],
                              stdin=tar.stdout, capture_output=True, text=True, env=podman,
                              check=False)
        tar.wait()
        assert done.returncode == 0, done.stderr
        for o in old:
            _run(["podman", "rmi", "-f", o], env=podman)
    return tag


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """`pcsc-bridge local` on the virtual backend: one socket that shows R0 (and R2, once
    plugged in), one that shows nothing, each alone in a folder a container mounts."""
    d = tmp_path_factory.mktemp("containers")
    os.chmod(d, 0o755)
    socks = {}
    for name in ("allowed", "denied"):
        (d / name).mkdir(mode=0o755)
        os.chmod(d / name, 0o755)          # a container's user is nobody here
        socks[name] = d / name / "pcscd.comm"
    control = d / "control.sock"
    conf = d / "local.yaml"
    conf.write_text(f"""\
log: {{level: info}}
local:
  backend: {{type: virtual}}
  virtual:
    control: {control}
    readers: [{{name: "{R0}"}}, {{name: "Virtual PCD 00 01", card: null}}]
  admin_socket: {d}/admin.sock
  sockets:
    - {{path: {socks['allowed']}, readers: ["{R0}", "{R2}"]}}
    - {{path: {socks['denied']}, readers: "nothing here*"}}
""")
    proc = Process(["local", "-c", str(conf)], str(d / "local.log"))
    for s in socks.values():
        wait_path(str(s))
    yield socks, control, proc
    proc.stop()


def contain(podman, release: str, sock: Path, script: str, background: bool = False):
    """``script`` run by python3 in a hardened container of ``release`` with ``sock``'s
    folder as its /run/pcscd: its result, or (``background``) the running process."""
    argv = ["podman", "run", "--rm", *HARDENED, "-v", f"{sock.parent}:/run/pcscd",
            image(podman, release), "python3", "-c", script]
    if background:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=podman)
    return subprocess.run(argv, capture_output=True, text=True, env=podman, check=False,
                          timeout=120)


@pytest.mark.parametrize("release", RELEASES)
def test_a_hardened_container_uses_the_readers_its_socket_shows(podman, local, release):
    socks, _, _ = local
    done = contain(podman, release, socks["allowed"], LIST_AND_SEND)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"readers 0 ['{R0}']" in done.stdout, done.stdout
    assert f"connect {R0} 0 transmit 0 5a9000" in done.stdout, done.stdout
    # the container's own user namespace: not root, not the host's uid 1000 either
    ids = _run(["podman", "run", "--rm", *HARDENED, image(podman, release), "cat",
                "/proc/self/uid_map"], env=podman)
    inside, outside, _n = ids.stdout.split()[:3]
    assert inside == "0" and int(outside) > 65535, ids.stdout   # none of the host's users


@pytest.mark.parametrize("release", RELEASES)
def test_a_container_denied_a_reader_cannot_reach_it(podman, local, release):
    socks, _, _ = local
    done = contain(podman, release, socks["denied"], LIST_AND_SEND)
    assert done.returncode == 0, done.stdout + done.stderr
    no_readers = 0x8010002E      # SCARD_E_NO_READERS_AVAILABLE
    assert f"readers {no_readers} []" in done.stdout, done.stdout
    unknown = 0x80100009         # SCARD_E_UNKNOWN_READER: it does not exist for them
    assert f"connect {R0} {unknown} transmit" in done.stdout, done.stdout


def test_a_reader_plugged_in_on_the_host_is_seen_inside(podman, local):
    socks, control, _ = local
    waiting = contain(podman, "sid", socks["allowed"], WAIT_FOR_READER, background=True)
    try:
        line = waiting.stdout.readline()
        assert line.startswith("waiting"), line + waiting.stdout.read()
        time.sleep(0.3)
        add = _run([sys.executable, "-m", "pcsc_bridge", "virtual", "--control",
                    str(control), "add-reader", R2, "card"])
        assert add.returncode == 0, add.stderr
        out, _ = waiting.communicate(timeout=30)
        assert out.startswith("woken 0") and R2 in out, out
    finally:
        waiting.kill()
        _run([sys.executable, "-m", "pcsc_bridge", "virtual", "--control", str(control),
              "remove-reader", R2])
    # the socket that shows nothing still shows nothing
    done = contain(podman, "bookworm", socks["denied"], LIST_AND_SEND)
    assert "readers 2148532270 []" in done.stdout, done.stdout
    assert json.dumps(R2) not in done.stdout


def test_the_agent_as_a_sidecar_of_an_application_container(podman, tmp_path):
    """A server on the host (virtual backend); the agent in a container of its own
    (read-only, non-root, no capabilities, its certificate and key as Podman secrets,
    the host's network to reach the server); the application in another, without
    network, sharing only the socket's folder with the agent."""
    from matrix.bridged import ROOT, package_tree
    from targets import free_port, make_pki, wait_port, write_server_config
    ca = make_pki(str(tmp_path), ("pod-7",))
    port = free_port()
    server = Process(["server", "-c", write_server_config(str(tmp_path), ca, port,
                                                          backend="virtual")],
                     str(tmp_path / "server.log"))
    shared = tmp_path / "run-pcscd"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o1777)            # the agent's user (uid 1000) makes the socket
    os.chmod(tmp_path, 0o755)
    tree = package_tree(str(tmp_path / "python"))
    config = tmp_path / "client.yaml"
    config.write_text(f"""\
client:
  server: "127.0.0.1:{port}"
  server_name: localhost
  cert: /run/secrets/guest.pem
  key: /run/secrets/guest-key.pem
  ca: /run/secrets/ca.pem
  socket: /run/pcscd/pcscd.comm
  admin_socket: null
""")
    os.chmod(config, 0o644)
    secrets = {"guest.pem": f"{ca}/pod-7.pem", "guest-key.pem": f"{ca}/pod-7-key.pem",
               "ca.pem": f"{ca}/ca.pem"}
    tag = f"t{os.getpid()}"
    for name, path in secrets.items():
        _run(["podman", "secret", "rm", f"{tag}-{name}"], env=podman)
        made = _run(["podman", "secret", "create", f"{tag}-{name}", path], env=podman)
        assert made.returncode == 0, made.stderr
    agent = None
    try:
        wait_port(port)
        agent = subprocess.Popen(
            ["podman", "run", "--rm", "--name", f"{tag}-agent", "--network=host",
             "--read-only", "--cap-drop=all", "--security-opt", "no-new-privileges",
             "--user", "1000:1000",   # (no user namespace of its own: with the host's
             # network, runc may not mount /sys in one)
             *[a for name in secrets for a in (
                 "--secret", f"{tag}-{name},target=/run/secrets/{name},uid=1000,mode=0400")],
             "--tmpfs", "/run/secrets:size=64k",   # (a read-only root has no such folder)
             "-v", f"{shared}:/run/pcscd", "-v", f"{config}:/etc/pcsc-bridge/client.yaml:ro",
             "-v", f"{ROOT}:{ROOT}:ro", "-v", f"{tree}:{tree}:ro", "-e", f"PYTHONPATH={tree}",
             image(podman, "trixie"), "python3", "-m", "pcsc_bridge", "client", "-c",
             "/etc/pcsc-bridge/client.yaml"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=podman)
        wait_path(str(shared / "pcscd.comm"), 30)
        deadline = time.monotonic() + 10
        while "guest.connected" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 'guest.connected guest=pod-7' in server.output(), server.output()
        done = contain(podman, "bookworm", shared / "pcscd.comm", LIST_AND_SEND)
        assert f"connect {R0} 0 transmit 0 5a9000" in done.stdout, done.stdout + done.stderr
    finally:
        _run(["podman", "stop", "-t", "2", f"{tag}-agent"], env=podman)
        if agent is not None:
            out = agent.communicate(timeout=30)[0]
            assert "agent.ready" in out, out
        for name in secrets:
            _run(["podman", "secret", "rm", f"{tag}-{name}"], env=podman)
        server.stop()


@pytest.fixture(scope="module")
def built(podman) -> str:
    """scripts/build-image's image (its Debian root cached like the chroots)."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([str(root / "scripts" / "build-image"), "--tag",
                           "localhost/pcsc-bridge:test"], capture_output=True, text=True,
                          env=podman, check=False, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MB, built in" in done.stderr
    return "localhost/pcsc-bridge:test"


def test_the_image_runs_server_agent_and_local_read_only_as_a_user(podman, built, tmp_path):
    from targets import free_port, make_pki, wait_port
    for argv in (["--version"], ["pcsc-bridge", "--version"]):    # with the command named too
        version = _run(["podman", "run", "--rm", "--read-only", built, *argv], env=podman)
        assert version.stdout.strip() == \
            f"pcsc-bridge {__import__('pcsc_bridge').__version__}", version.stderr
    ca = make_pki(str(tmp_path), ("pod-7",))
    for f in [Path(ca), *Path(ca).iterdir()]:     # the image's user reads its files
        os.chown(f, 10001, 10001)
    os.chmod(tmp_path, 0o755)
    port = free_port()
    shared = {n: tmp_path / n for n in ("agent", "local")}
    for d in shared.values():
        d.mkdir()
        os.chown(d, 10001, 10001)
    (tmp_path / "server.yaml").write_text(f"""\
server:
  listen: ["127.0.0.1:{port}"]
  cert: {ca}/host.pem
  key: {ca}/host-key.pem
  ca: {ca}/ca.pem
  backend: {{type: virtual}}
  admin_socket: null
""")
    (tmp_path / "client.yaml").write_text(f"""\
client:
  server: "127.0.0.1:{port}"
  server_name: localhost
  cert: {ca}/pod-7.pem
  key: {ca}/pod-7-key.pem
  ca: {ca}/ca.pem
  socket: /run/pcscd/pcscd.comm
  admin_socket: null
""")
    (tmp_path / "local.yaml").write_text("""\
local:
  backend: {type: virtual}
  admin_socket: null
  sockets: [{path: /run/pcscd/pcscd.comm, readers: "Virtual PCD 00 00"}]
""")
    common = ["podman", "run", "-d", "--read-only", "--cap-drop=all", "--security-opt",
              "no-new-privileges", "-v", f"{tmp_path}:{tmp_path}:ro"]
    names = [f"t{os.getpid()}-{n}" for n in ("server", "agent", "local")]
    try:
        for name, extra, args in (
                (names[0], ["--network=host"], ["server", "-c", f"{tmp_path}/server.yaml"]),
                (names[1], ["--network=host", "-v", f"{shared['agent']}:/run/pcscd"],
                 ["client", "-c", f"{tmp_path}/client.yaml"]),
                (names[2], ["--network=none", "-v", f"{shared['local']}:/run/pcscd"],
                 ["local", "-c", f"{tmp_path}/local.yaml"])):
            started = _run([*common, "--name", name, *extra, built, *args], env=podman)
            assert started.returncode == 0, started.stderr
            if name == names[0]:
                wait_port(port)
        for d in shared.values():
            wait_path(str(d / "pcscd.comm"), 30)
            done = contain(podman, "trixie", d / "pcscd.comm", LIST_AND_SEND)
            assert f"connect {R0} 0 transmit 0 5a9000" in done.stdout, \
                done.stdout + done.stderr + _run(["podman", "logs", names[0]], env=podman).stdout
        for name in names:                    # each as the image's user, not root
            top = _run(["podman", "exec", name, "cat", "/proc/1/status"], env=podman).stdout
            assert re.search(r"^Uid:\s+10001\s", top, re.MULTILINE), top
    finally:
        for name in names:
            _run(["podman", "rm", "-f", "-t", "1", name], env=podman)


# --- deploy/kubernetes/, played with `podman kube play` ----------------------------------
KUBE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
# the application of the manifests' pods: waits for its socket, then LIST_AND_SEND
APP = "import os, time\nfor _ in range(200):\n    if os.path.exists('/run/pcscd/pcscd.comm'):\n" \
      "        break\n    time.sleep(0.1)\n" + LIST_AND_SEND


def playable(name: str, text: dict[str, str], secrets: dict[str, Path],
             host: dict[str, str], app_image: str, scratch: Path) -> str:
    """deploy/kubernetes/NAME as `podman kube play` 4.3 takes it, the test's addresses and
    files in it (``text``: replacements), and what Podman 4.3 lacks stood in for: a
    DaemonSet runs as a Deployment of one pod (Podman has no DaemonSet before 4.7), a
    Secret volume is a folder of the same files (4.3's kube play cannot mount one), an
    emptyDir a folder of ``scratch`` the pod's user may write to (4.3 applies no fsGroup),
    the
    pods use the host's network instead of a Service, hostPaths are the test's folders
    (``host``), and the application's image is the test's, running APP."""
    import yaml
    raw = (KUBE / name).read_text()
    for old, new in text.items():
        assert old in raw, (name, old)
        raw = raw.replace(old, new)
    out = []
    for doc in yaml.safe_load_all(raw):
        kind = doc["kind"]
        if kind in ("Namespace", "Service"):
            continue
        doc["metadata"].pop("namespace", None)
        if kind == "DaemonSet":
            doc["kind"] = "Deployment"
            doc["spec"]["replicas"] = 1
        if kind == "ConfigMap":
            out.append(doc)
            continue
        spec = doc["spec"] if kind == "Pod" else doc["spec"]["template"]["spec"]
        spec.pop("nodeSelector", None)
        spec["hostNetwork"] = True
        spec["restartPolicy"] = "Never"   # (4.3 restarts a Deployment's init containers)
        for v in spec["volumes"]:
            if "secret" in v:
                v["hostPath"] = {"path": str(secrets[v.pop("secret")["secretName"]]),
                                 "type": "Directory"}
            elif "hostPath" in v and v["hostPath"]["path"] in host:
                v["hostPath"]["path"] = host[v["hostPath"]["path"]]
            elif "emptyDir" in v:
                v.pop("emptyDir")
                d = scratch / v["name"]
                d.mkdir(parents=True)
                os.chown(d, 10001, 10001)
                v["hostPath"] = {"path": str(d), "type": "Directory"}
        for c in [*spec.get("initContainers", ()), *spec["containers"]]:
            c.pop("ports", None)               # the host's network: its ports as they are
            c["image"] = c["image"].replace("pcsc-bridge:0.1.0", "localhost/pcsc-bridge:test")
            if c["image"] == "my-ci-runner:latest":
                c.update(image=app_image, command=["python3", "-c", APP])
        out.append(doc)
    return yaml.safe_dump_all(out)


def pem_folder(path: Path, cert: str, key: str, ca: str) -> Path:
    """A Secret's files (cert-manager's names) as the kubelet gives them: the group's."""
    path.mkdir(parents=True)
    for name, src in (("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)):
        shutil.copy(src, path / name)
        os.chown(path / name, 0, 10001)
        os.chmod(path / name, 0o440)
    os.chmod(path, 0o755)
    return path


def logs_of(podman, container: str, want: str, timeout: float = 60) -> str:
    """The output of the pod's container whose name ends in ``container``, once it shows
    ``want`` (or the time is up)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        names = _run(["podman", "ps", "-a", "--format", "{{.Names}}"], env=podman).stdout
        for n in names.split():
            if n.endswith(container):
                out = _run(["podman", "logs", n], env=podman).stdout
                if want in out:
                    return out
        time.sleep(0.5)
    return out


def test_the_kubernetes_manifests_play_with_a_certificate_per_pod(podman, built, targets,
                                                                   tmp_path):
    """server.yaml (pcscd of the host), agent-sidecar.yaml twice with two pod identities
    (ci-runner-a, ci-runner-b: each sees the reader its CN is given), local.yaml and
    tenant-pod.yaml (a tenant's pod through a node's local socket)."""
    from targets import free_port, make_pki, wait_port
    targets.get("pcscd").reset()            # the test card in reader 0, reader 1 empty
    os.chmod(tmp_path, 0o755)
    ca = make_pki(str(tmp_path), ("ci-runner-a", "ci-runner-b"))
    port = free_port()
    secrets = {"pcsc-bridge-server-tls": pem_folder(tmp_path / "server-tls", f"{ca}/host.pem",
                                                     f"{ca}/host-key.pem", f"{ca}/ca.pem")}
    for runner in ("ci-runner-a", "ci-runner-b"):
        secrets[f"{runner}-tls"] = pem_folder(tmp_path / f"{runner}-tls", f"{ca}/{runner}.pem",
                                              f"{ca}/{runner}-key.pem", f"{ca}/ca.pem")
    sockets = tmp_path / "pcsc-bridge-local"
    sockets.mkdir()
    os.chown(sockets, 10001, 10001)
    host = {"/run/pcsc-bridge-local": str(sockets),
            "/run/pcsc-bridge-local/team-a": str(sockets / "team-a")}
    app_image = image(podman, "trixie")
    played = []

    def play(name: str, text: dict[str, str], tag: str = "") -> None:
        f = tmp_path / f"{tag or name}"
        f.write_text(playable(name, text, secrets, host, app_image,
                              tmp_path / f"{tag or name}.d"))
        done = _run(["podman", "kube", "play", "--replace", str(f)], env=podman)
        assert done.returncode == 0, done.stdout + done.stderr
        played.append(f)
    try:
        play("server.yaml", {"0.0.0.0:8443": f"127.0.0.1:{port}"})
        wait_port(port, 30)
        for runner in ("ci-runner-a", "ci-runner-b"):
            play("agent-sidecar.yaml", {
                '"pcsc-bridge.pcsc-bridge.svc:8443"':
                    f'"127.0.0.1:{port}"\n      server_name: localhost',
                "ci-runner-a": runner, "name: pcsc-bridge-agent": f"name: agent-{runner}"},
                f"{runner}.yaml")
        for runner, reader in (("ci-runner-a", R0), ("ci-runner-b", "Virtual PCD 00 01")):
            out = logs_of(podman, f"{runner}-pod-0-app", "connect")
            assert f"readers 0 ['{reader}']" in out, (
                runner, out, logs_of(podman, f"{runner}-pod-0-agent", "", 1),
                logs_of(podman, "pcsc-bridge-server-pod-0-server", "", 1))
        out = logs_of(podman, "ci-runner-a-pod-0-app", "transmit")
        assert f"connect {R0} 0 transmit 0 5a9000" in out, out
        out = logs_of(podman, "ci-runner-b-pod-0-app", "transmit")
        assert "connect Virtual PCD 00 01 2148532236" in out, out    # no card in it
        # a node's local and a tenant's pod
        play("local.yaml", {})
        wait_path(str(sockets / "team-a" / "pcscd.comm"), 30)
        play("tenant-pod.yaml", {})
        out = logs_of(podman, "team-a-job-job", "transmit")
        assert f"readers 0 ['{R0}']" in out and f"connect {R0} 0 transmit 0 5a9000" in out, out
    finally:
        for f in reversed(played):
            _run(["podman", "kube", "down", str(f)], env=podman)
