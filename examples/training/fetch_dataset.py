#!/usr/bin/env python3
"""Fetch a signed data set or checkpoint shard set for a training job, through drun.

Every piece is checked against the publisher's signature before it is sealed into the node's
encrypted store; the verified files are then written to --out for the training code to read. Pieces
already in the store (from an earlier, interrupted run, or another job on this node) are not fetched
again, so Ctrl-C (or SIGTERM from a scheduler) is safe: rerun the same command to resume.

    python3 fetch_dataset.py --signature https://data.example.com/corpus/model.sig \\
        --public-key publisher.pub --origin https://data.example.com/corpus/ \\
        --store /var/cache/drun --key-source file:/etc/drun/node.key --out /scratch/corpus

A progress bar goes to stderr (redrawn in place on a terminal, one line per second otherwise, so
job logs stay readable); a summary goes to stdout. Exit status: 0 done; 1 a byte or the bundle does
not match the signature; 2 bad arguments or configuration; 3 an origin, peer or the store failed;
4 refused by a peer; 130 interrupted.
"""

import argparse
import os
import signal
import sys
import time

import drun

MiB = 1 << 20


def parse_rate(text):
    """'500000', '512K', '2M' or '1G' bytes per second."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper()
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate in bytes/s: {text!r}") from None


def parse_args(argv):
    p = argparse.ArgumentParser(description="Fetch a signed data set or checkpoint through drun.")
    p.add_argument("--signature", required=True, help="URL or file of the signed bundle (model.sig)")
    trust = p.add_mutually_exclusive_group(required=True)
    trust.add_argument("--public-key", help="the publisher's public key (PEM)")
    trust.add_argument("--ca-bundle", help="CA certificates for certificate-signed bundles (PEM)")
    p.add_argument("--origin", action="append", default=[], help="base URL serving the files (repeatable)")
    p.add_argument("--peer", action="append", default=[], help="HOST:PORT of a drun peer (repeatable)")
    p.add_argument("--store", required=True, help="the node's drun store directory")
    p.add_argument("--key-source", required=True, help="the store's node key: file:PATH, env:NAME or cmd:COMMAND")
    p.add_argument("--out", required=True, help="where the verified files go (must not exist, or be empty)")
    p.add_argument("--connections", type=int, default=0, help="pieces in flight (default: drun's)")
    p.add_argument("--limit-rate", type=parse_rate, default=0, help="bytes/s for the whole fetch (K, M, G suffixes)")
    p.add_argument("--ca-cert", help="CA for HTTPS origins and peers (PEM)")
    p.add_argument("--tls-cert", help="client certificate for peers (PEM)")
    p.add_argument("--tls-key", help="its private key (PEM, mode 0600)")
    p.add_argument("--token-file", help="a bearer token for peers, in a 0600 file")
    args = p.parse_args(argv)
    if not args.origin and not args.peer:
        p.error("give --origin and/or --peer")
    if os.path.isdir(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out} exists and is not empty")
    return args


class ProgressBar:
    """The fetch's progress callback: drun calls it after every stored piece, from its own threads,
    with the GIL held and one call at a time."""

    def __init__(self, stream=sys.stderr, width=30, interval=1.0):
        self.stream, self.width, self.interval = stream, width, interval
        self.tty = stream.isatty()
        self.last_print = None
        self.last = None  # the latest figures, for the summary

    def __call__(self, p):
        self.last = p
        now = time.monotonic()
        final = p["pieces_done"] == p["pieces_total"]
        if not self.tty and not final and self.last_print is not None and now - self.last_print < self.interval:
            return
        self.last_print = now
        done, total = p["bytes_done"], p["bytes_total"]
        frac = done / total if total else 1.0
        filled = int(frac * self.width)
        left = int(round(p["seconds_left"]))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {frac * 100:5.1f}%  "
                f"{done / MiB:.1f}/{total / MiB:.1f} MiB  {p['pieces_done']}/{p['pieces_total']} pieces  "
                f"{p['bytes_per_second'] / MiB:.1f} MiB/s  {left // 60}:{left % 60:02d} left")
        self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.stream.flush()

    def end_line(self):
        """Ends a half-drawn terminal line (before a message)."""
        if self.tty and self.last and self.last["pieces_done"] != self.last["pieces_total"]:
            self.stream.write("\n")
            self.stream.flush()


def fetch(args, bar):
    store = drun.Store(args.store, key_source=args.key_source)
    token = None
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    started = time.monotonic()
    artifact = drun.fetch(store=store, signature=args.signature, public_key=args.public_key,
                          ca_bundle=args.ca_bundle, origins=args.origin, peers=args.peer, progress=bar,
                          out=args.out, connections=args.connections, limit_rate=args.limit_rate,
                          ca_cert=args.ca_cert, tls_cert=args.tls_cert, tls_key=args.tls_key, token=token)
    seconds = time.monotonic() - started
    files = store.files(artifact)
    total = sum(f["size"] for f in files)
    fetched = bar.last["bytes_done"] if bar.last else 0
    print(f"fetched {artifact}: {len(files)} files, {total / MiB:.1f} MiB in {args.out}; "
          f"{fetched / MiB:.1f} MiB downloaded in {seconds:.1f} s, {(total - fetched) / MiB:.1f} MiB already stored")


EXIT = [(drun.VerificationError, 1), (drun.ConfigError, 2), (drun.SourceError, 3), (drun.StoreError, 3),
        (drun.AuthorizationError, 4), (drun.Error, 3)]


def main(argv=None):
    args = parse_args(argv)
    # A scheduler stops a job with SIGTERM: stop the same clean way as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    bar = ProgressBar()
    try:
        fetch(args, bar)
    except KeyboardInterrupt:
        # drun has stopped its transfers; every piece it stored was verified and stays stored.
        bar.end_line()
        print("interrupted; rerun to resume", file=sys.stderr)
        return 130
    except drun.Error as e:
        bar.end_line()
        print(f"fetch_dataset: {e}", file=sys.stderr)
        return next(code for cls, code in EXIT if isinstance(e, cls))
    except OSError as e:  # the token file
        print(f"fetch_dataset: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
