#!/usr/bin/env python3
"""Lock cycles per second through one, then through two TYL servers on one
PostgreSQL database (issue 7).

    python3 test/postgres_benchmark.py                # 3 rounds of 10 s
    python3 test/postgres_benchmark.py --seconds 3 --rounds 1

A throwaway cluster (postgres_cluster.py) with fsync on, as in production,
and TYL processes on postgres_backend, all on 127.0.0.1 on this machine.
The workload is benchmark.py's apply cycle: each client runs LOCK, GET,
POST ?ID=, UNLOCK of a 5 KB state on its own environment, over a keep-alive
connection.  With two servers, client i talks to server i % 2.  Clients,
servers and PostgreSQL share the machine's cores, so a second server adds
no CPU: the figures show what sharing one database costs, not what a
second host would add.

Not a test module: pytest collects only test_*.py.
"""

import argparse
import itertools
import os
import statistics
import sys
import tempfile

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchmark  # noqa: E402
import postgres_cluster  # noqa: E402


class RoundRobin(object):
    """Servers that hand out client connections in turn, as benchmark.py's
    workloads ask one server for them."""

    def __init__(self, servers):
        self.kind = 'TYL x%d' % len(servers)
        self.servers = servers
        self.turn = itertools.count()

    def connection(self):
        return self.servers[next(self.turn) % len(self.servers)].connection()


def start_servers(cluster, workdir, count):
    config = dict(cluster.config(cluster.new_database()), BACKEND_SERVICE_IP='127.0.0.1',
                  BACKEND_SERVICE_PORT=0, LOG_LEVEL='WARNING')
    servers = []
    for number in range(count):
        directory = os.path.join(workdir, 'tyl-%d-of-%d' % (number, count))
        os.makedirs(directory)
        config_path = os.path.join(directory, 'config.yaml')
        with open(config_path, 'w') as stream:
            yaml.safe_dump(config, stream)
        servers.append(benchmark.ServerProcess(
            'TYL', [sys.executable, benchmark.TYLSERVER, '--config', config_path], directory,
            {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}))
    return servers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--seconds', type=float, default=10, help='seconds a round (default 10)')
    parser.add_argument('--rounds', type=int, default=3, help='rounds per figure (default 3)')
    args = parser.parse_args(argv)
    cluster = postgres_cluster.Cluster(durable=True)
    state = benchmark.make_state(5 * 1024)
    try:
        with tempfile.TemporaryDirectory(prefix='tyl-pg-bench-') as workdir:
            for count in (1, 2):
                servers = start_servers(cluster, workdir, count)
                try:
                    for clients in (1, 8):
                        figures = [benchmark.apply_cycles(RoundRobin(servers), clients, state, args.seconds,
                                                          'c%d-s%d-r%d' % (clients, count, n))
                                   for n in range(args.rounds)]
                        print('%d server%s, %d client%s: %7.1f cycles/s (median of %d), p50 %.2f ms, '
                              'p99 %.2f ms a request' % (
                                  count, 's' if count > 1 else ' ', clients, 's' if clients > 1 else ' ',
                                  statistics.median(f['cycles/s'] for f in figures), args.rounds,
                                  statistics.median(f['p50 ms'] for f in figures),
                                  statistics.median(f['p99 ms'] for f in figures)), flush=True)
                finally:
                    for server in servers:
                        server.stop()
    finally:
        cluster.remove()
    return 0


if __name__ == '__main__':
    sys.exit(main())
