"""pcsc-bridge demo: throwaway certificates, a host server and a guest agent on loopback,
and a pcsc-lite application (pyscard over the real libpcsclite) through the agent's socket.
The server uses this host's pcscd when it runs, else the embedded virtual readers."""

import os
import socket
import subprocess
import sys
import tempfile
import time

PY = sys.executable


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args):
    subprocess.run([PY, "-m", "pcsc_bridge", *args], check=True, stdout=subprocess.DEVNULL)


def application():
    from smartcard import scard as s
    hr, ctx = s.SCardEstablishContext(s.SCARD_SCOPE_USER)
    if hr:
        return print(f"  SCardEstablishContext: {s.SCardGetErrorMessage(hr)}")
    hr, readers = s.SCardListReaders(ctx, [])
    print(f"  readers: {readers if hr == 0 else s.SCardGetErrorMessage(hr)}")
    for r in readers if hr == 0 else []:
        hr, card, proto = s.SCardConnect(ctx, r, s.SCARD_SHARE_SHARED,
                                         s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1)
        if hr:
            print(f"  {r}: {s.SCardGetErrorMessage(hr).strip()}")
            continue
        hr, _name, _state, _protocol, atr = s.SCardStatus(card)
        print(f"  {r}: card ATR {bytes(atr).hex(' ').upper()}")
        hr, resp = s.SCardTransmit(card, proto, [0x00, 0xA4, 0x04, 0x00, 0x08,
                                                 0xA0, 0x00, 0x00, 0x05, 0x27, 0x21, 0x01, 0x01])
        print(f"    SELECT A000000527210101 -> {bytes(resp).hex(' ').upper()}")
        s.SCardDisconnect(card, s.SCARD_LEAVE_CARD)
    s.SCardReleaseContext(ctx)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--app":
        return application()
    d = tempfile.mkdtemp(prefix="pcsc-bridge-demo-")
    ca = os.path.join(d, "ca")
    cli("certs", "init", "--dir", ca)
    cli("certs", "server", "--dir", ca, "host", "--dns", "localhost", "--ip", "127.0.0.1")
    cli("certs", "client", "--dir", ca, "demo-guest")
    port, sock = free_port(), os.path.join(d, "pcscd.comm")
    backend = "pcscd" if os.path.exists("/run/pcscd/pcscd.comm") else "virtual"
    with open(os.path.join(d, "demo.yaml"), "w") as f:
        f.write(f"""log: {{level: warning}}
server:
  listen: ["127.0.0.1:{port}"]
  cert: ca/host.pem
  key: ca/host-key.pem
  ca: ca/ca.pem
  crl: ca/crl.pem
  backend: {{type: {backend}}}
client:
  server: "127.0.0.1:{port}"
  server_name: localhost
  cert: ca/demo-guest.pem
  key: ca/demo-guest-key.pem
  ca: ca/ca.pem
  socket: {sock}
""")
    conf = os.path.join(d, "demo.yaml")
    server = subprocess.Popen([PY, "-m", "pcsc_bridge", "server", "-c", conf])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    agent = subprocess.Popen([PY, "-m", "pcsc_bridge", "client", "-c", conf])
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.1)
        time.sleep(0.5)
        print(f"pcsc-bridge demo: server on 127.0.0.1:{port} (backend {backend}), "
              f"agent socket {sock}")
        print("An unmodified pcsc-lite application through the bridge:")
        subprocess.run([PY, __file__, "--app"], env={**os.environ, "PCSCLITE_CSOCK_NAME": sock},
                       check=True)
        print("\nPoint any other pcsc-lite application at the bridge with:")
        print(f"  PCSCLITE_CSOCK_NAME={sock} pcsc_scan")
        print(f"  PCSCLITE_CSOCK_NAME={sock} opensc-tool -l")
        if sys.stdin.isatty():
            print("(Ctrl-C stops the demo)")
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        agent.terminate()
        server.terminate()
        agent.wait()
        server.wait()


if __name__ == "__main__":
    main()
