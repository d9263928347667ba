#!/usr/bin/env python3
"""Benchmark TYL against a minimal in-memory reference server (issue 6).

    python3 test/benchmark.py                 # full run, 3 rounds, a few minutes
    python3 test/benchmark.py --quick         # small sizes, a smoke run of ~30 s
    python3 test/benchmark.py --only apply,contention --rounds 5
    python3 test/benchmark.py --backend sqlite --only apply,get,envs

Both servers run on 127.0.0.1 as separate processes of this Python: TYL as
`tylserver.py --config <temp>/config.yaml` on the file backend (every write
fsynced, as shipped; --backend sqlite for the SQLite one), and the reference as `benchmark.py --reference-server 0`,
a bare `ThreadingHTTPServer` holding a dict and a mutex per environment that
speaks the same protocol and persists nothing: the ceiling for a stdlib
server.  Clients are keep-alive `http.client` connections in threads of this
process.  Every workload runs round by round, TYL then reference, TYL then
reference..., and reports medians and the median of the per-round ratios,
so that the figures hold on a noisy two-core machine.

Workloads (--only takes a comma-separated list of these names):
  apply       LOCK, GET, POST ?ID=, UNLOCK on a 5 KB state; 1 client, then 8 on 8 envs
  get         GET of a 5 KB state, 8 clients on one environment
  bigstate    a 50 MB version-4 state: POST and GET MB/s, peak memory over idle
  envs        500 environments, one POST and one GET each: seconds, memory after
  contention  16 clients fighting for one environment's lock; no two may hold it
  scale       10,000 environments on disk: TYL start-up and memory after one GET each
  storage     the file backend called directly, no HTTP: ms per LOCK, state write and
              UNLOCK, and per new environment's first write and read (the floor under
              apply and envs)

This file is not a test module: pytest collects only test_*.py, and nothing
imports it.  Standard library only, but for the storage workload, which
imports TYL's own modules and so needs PyYAML as TYL does.
"""

import argparse
import atexit
import http.client
import http.server
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TYLSERVER = os.path.join(ROOT, 'tylserver.py')
LISTENING = re.compile(r'listening on http://127\.0\.0\.1:(\d+)/')
HOST = '127.0.0.1'
MB = 1024 * 1024

WORKLOADS = ('apply', 'get', 'bigstate', 'envs', 'contention', 'scale', 'storage')
# The workloads that lay out or call the file backend themselves.
FILE_ONLY = {'scale', 'storage'}


# --------------------------------------------------------------------------
# The reference server: run as `benchmark.py --reference-server PORT`
# --------------------------------------------------------------------------

class _RefEnvironment(object):
    __slots__ = ('state', 'lock', 'lock_id', 'mutex')

    def __init__(self):
        self.state = b''
        self.lock = b''
        self.lock_id = None
        self.mutex = threading.Lock()


class ReferenceHandler(http.server.BaseHTTPRequestHandler):
    """LOCK/UNLOCK/GET/POST with 423 on conflict, all in memory.

    Each response leaves in one send() (status line, headers and body
    together; a body over 64 KB in a second send, not copied) on a
    TCP_NODELAY socket, as a careful stdlib server would:
    a reply split in two writes on a Nagle socket waits for the client's
    delayed ACK (about 40 ms on Linux) before its second part goes out.
    """

    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True
    environments = {}
    environments_lock = threading.Lock()

    def log_message(self, format, *args):
        pass

    def reply(self, status, body=b''):
        self.send_response(status)
        if body:
            self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        if len(body) <= 65536:
            self._headers_buffer.append(b'\r\n' + body)  # what end_headers adds, plus the body
            self.flush_headers()
        else:                                            # no copies of a big body
            self.end_headers()
            self.wfile.write(body)

    def parse(self):
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        name = query.get('env', [None])[0]
        if not name:
            return url.path, query, body, None
        with self.environments_lock:
            environment = self.environments.get(name)
            if environment is None:
                environment = self.environments[name] = _RefEnvironment()
        return url.path, query, body, environment

    def do_GET(self):
        path, _, _, environment = self.parse()
        if path != '/' or environment is None:
            return self.reply(404)
        with environment.mutex:
            state = environment.state
        self.reply(200, state) if state else self.reply(204)

    def do_POST(self):
        path, query, body, environment = self.parse()
        if environment is None:
            return self.reply(404)
        if path == '/lock':
            return self.take_lock(environment, body)
        if path != '/':
            return self.reply(404)
        lock_id = query.get('ID', [None])[0]
        with environment.mutex:
            if environment.lock_id is not None and lock_id != environment.lock_id:
                return self.reply(423, environment.lock)
            if environment.lock_id is None and lock_id is not None:
                return self.reply(409)
            environment.state = body
        self.reply(200)

    do_PUT = do_POST

    def do_LOCK(self):
        _, _, body, environment = self.parse()
        if environment is None:
            return self.reply(404)
        self.take_lock(environment, body)

    def take_lock(self, environment, body):
        try:
            lock_id = json.loads(body)['ID']
        except (ValueError, KeyError, TypeError):
            return self.reply(400)
        with environment.mutex:
            if environment.lock_id is not None:
                return self.reply(200 if environment.lock_id == lock_id else 423, environment.lock)
            environment.lock, environment.lock_id = body, lock_id
        self.reply(200, body)

    def do_UNLOCK(self):
        _, _, body, environment = self.parse()
        if environment is None:
            return self.reply(404)
        lock_id = None
        if body.strip():
            try:
                lock_id = json.loads(body)['ID']
            except (ValueError, KeyError, TypeError):
                return self.reply(400)
        with environment.mutex:
            if environment.lock_id is None:
                return self.reply(200)
            if lock_id is not None and lock_id != environment.lock_id:
                return self.reply(409, environment.lock)
            environment.lock, environment.lock_id = b'', None
        self.reply(200)

    do_DELETE = do_UNLOCK


def run_reference_server(port):
    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

        def server_bind(self):
            # no reverse DNS lookup, like TYL
            http.server.socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = self.server_address[:2]

    server = Server((HOST, port), ReferenceHandler)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print('reference listening on http://%s:%d/' % (HOST, server.server_port),
          file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------

_RUNNING = []


def _die_with_parent():
    """In the child: get SIGKILL if the benchmark dies without cleaning up."""
    try:
        import ctypes
        ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _kill_all():
    for server in list(_RUNNING):
        server.kill()


atexit.register(_kill_all)


class ServerProcess(object):
    """A TYL or reference server process; `startup` is Popen to listening line."""

    def __init__(self, kind, argv, workdir, env=None):
        self.kind = kind
        os.makedirs(workdir, exist_ok=True)
        self.log_path = os.path.join(workdir, '%s.log' % kind)
        log = open(self.log_path, 'ab')
        offset = log.tell()
        started = time.monotonic()
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=env, preexec_fn=_die_with_parent)
        finally:
            log.close()
        _RUNNING.append(self)
        self.pid = self.process.pid
        self.port = None
        deadline = started + 30
        with open(self.log_path, 'rb') as reader:
            reader.seek(offset)
            seen = b''
            while time.monotonic() < deadline:
                seen += reader.read()
                found = LISTENING.search(seen.decode('utf-8', 'replace'))
                if found:
                    self.startup = time.monotonic() - started
                    self.port = int(found.group(1))
                    return
                if self.process.poll() is not None:
                    break
                time.sleep(0.001)
        self.kill()
        raise RuntimeError('%s server did not start:\n%s' % (kind, seen.decode('utf-8', 'replace')))

    def memory(self, field='VmRSS'):
        """A /proc/PID/status figure in bytes."""
        with open('/proc/%d/status' % self.pid) as status:
            for line in status:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
        raise RuntimeError('no %s for pid %d' % (field, self.pid))

    def connection(self, timeout=120):
        return Client(self.port, timeout)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self in _RUNNING:
            _RUNNING.remove(self)


# The stores --backend chooses: their BACKEND_CLASS, and the config key
# that puts their data under the data path given to start_tyl.
BACKENDS = {
    'file': ('file_backend.FileBackend', 'FILE_DATA_PATH', ''),
    'sqlite': ('sqlite_backend.SQLiteBackend', 'SQLITE_DB_PATH', 'tyl.sqlite3'),
}


def start_tyl(workdir, data_path, log_level, backend='file'):
    os.makedirs(workdir, exist_ok=True)
    config_path = os.path.join(workdir, 'config.yaml')
    backend_class, path_key, file_name = BACKENDS[backend]
    with open(config_path, 'w') as config:
        # JSON strings are YAML scalars; no PyYAML needed here.
        config.write('BACKEND_SERVICE_IP: "127.0.0.1"\nBACKEND_SERVICE_PORT: 0\n'
                     'BACKEND_CLASS: %s\n%s: %s\nLOG_LEVEL: %s\n'
                     % (backend_class, path_key, json.dumps(os.path.join(data_path, file_name)),
                        json.dumps(log_level)))
    env = {k: v for k, v in os.environ.items() if not k.startswith('TYL_')}
    return ServerProcess('TYL', [sys.executable, TYLSERVER, '--config', config_path], workdir, env)


def start_reference(workdir):
    return ServerProcess('reference', [sys.executable, os.path.abspath(__file__),
                                       '--reference-server', '0'], workdir)


# --------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------

class Client(object):
    """One keep-alive connection; `request` returns (status, body, seconds)."""

    def __init__(self, port, timeout=120):
        self.port = port
        self.timeout = timeout
        self.connection = http.client.HTTPConnection(HOST, port, timeout=timeout)

    def connect(self):
        self.connection.connect()

    def request(self, method, path, body=None):
        headers = {'Content-Type': 'application/json'} if body is not None else {}
        for attempt in (0, 1):
            started = time.perf_counter()
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                data = response.read()
                return response.status, data, time.perf_counter() - started
            except (http.client.HTTPException, OSError):
                self.connection.close()
                if attempt:
                    raise

    def close(self):
        self.connection.close()


def lock_info(lock_id):
    return json.dumps({
        'ID': lock_id, 'Operation': 'OperationTypeApply', 'Info': '',
        'Who': 'bench@%s' % socket.gethostname(), 'Version': '1.5.7',
        'Created': '2024-01-01T00:00:00.000000000Z', 'Path': '',
    }).encode('utf-8')


class Threads(object):
    """Run `target(index, start)` in n threads.  Each thread prepares (connects),
    then calls start() which waits for the others; returns the common start time."""

    def __init__(self, count, target, timeout):
        self.barrier = threading.Barrier(count + 1)
        self.errors = []
        self.results = [None] * count
        self.threads = [threading.Thread(target=self._run, args=(target, i), daemon=True)
                        for i in range(count)]
        for thread in self.threads:
            thread.start()
        try:
            self.barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            for thread in self.threads:
                thread.join(10)
            raise RuntimeError('client threads failed to start: %s' % (self.errors[:1] or 'timeout'))
        self.started = time.monotonic()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            raise RuntimeError('client threads still running after %.0f s' % timeout)
        if self.errors:
            raise RuntimeError('client thread failed: %s' % self.errors[0])
        self.ended = time.monotonic()

    def _start(self):
        self.barrier.wait(timeout=60)
        return time.monotonic()

    def _run(self, target, index):
        try:
            self.results[index] = target(index, self._start)
        except Exception as error:
            self.errors.append('%s: %s' % (type(error).__name__, error))
            try:
                self.barrier.abort()
            except Exception:
                pass


def percentile(values, q):
    if not values:
        return float('nan')
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------
# A realistic version-4 state
# --------------------------------------------------------------------------

AWS = 'provider["registry.terraform.io/hashicorp/aws"]'


def _hex(rng, n):
    return '%0*x' % (n, rng.getrandbits(4 * n))


def _instance_attributes(rng, name, index):
    iid = 'i-0' + _hex(rng, 16)
    subnet = 'subnet-0' + _hex(rng, 16)
    ip = '10.%d.%d.%d' % (rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
    return {
        'ami': 'ami-0' + _hex(rng, 16),
        'arn': 'arn:aws:ec2:eu-west-1:123456789012:instance/' + iid,
        'associate_public_ip_address': False,
        'availability_zone': 'eu-west-1' + rng.choice('abc'),
        'capacity_reservation_specification': [{
            'capacity_reservation_preference': 'open', 'capacity_reservation_target': []}],
        'cpu_core_count': 2, 'cpu_options': [{'amd_sev_snp': '', 'core_count': 2, 'threads_per_core': 2}],
        'cpu_threads_per_core': 2, 'credit_specification': [], 'disable_api_stop': False,
        'disable_api_termination': False, 'ebs_block_device': [], 'ebs_optimized': True,
        'enclave_options': [{'enabled': False}], 'ephemeral_block_device': [],
        'get_password_data': False, 'hibernation': False, 'host_id': '', 'host_resource_group_arn': None,
        'iam_instance_profile': '%s-profile' % name, 'id': iid,
        'instance_initiated_shutdown_behavior': 'stop', 'instance_lifecycle': '',
        'instance_market_options': [], 'instance_state': 'running',
        'instance_type': rng.choice(['t3.medium', 'm5.large', 'c5.xlarge', 'r5.large']),
        'ipv6_address_count': 0, 'ipv6_addresses': [], 'key_name': 'deploy',
        'launch_template': [], 'maintenance_options': [{'auto_recovery': 'default'}],
        'metadata_options': [{'http_endpoint': 'enabled', 'http_protocol_ipv6': 'disabled',
                              'http_put_response_hop_limit': 1, 'http_tokens': 'required',
                              'instance_metadata_tags': 'disabled'}],
        'monitoring': False, 'network_interface': [], 'outpost_arn': '', 'password_data': '',
        'placement_group': '', 'placement_partition_number': 0,
        'primary_network_interface_id': 'eni-0' + _hex(rng, 16),
        'private_dns': 'ip-%s.eu-west-1.compute.internal' % ip.replace('.', '-'),
        'private_dns_name_options': [{'enable_resource_name_dns_a_record': False,
                                      'enable_resource_name_dns_aaaa_record': False,
                                      'hostname_type': 'ip-name'}],
        'private_ip': ip, 'public_dns': '', 'public_ip': '', 'secondary_private_ips': [],
        'root_block_device': [{'delete_on_termination': True, 'device_name': '/dev/xvda',
                               'encrypted': True, 'iops': 3000,
                               'kms_key_id': 'arn:aws:kms:eu-west-1:123456789012:key/' + str(uuid.UUID(int=rng.getrandbits(128))),
                               'tags': {}, 'throughput': 125, 'volume_id': 'vol-0' + _hex(rng, 16),
                               'volume_size': rng.choice([8, 20, 50, 100]), 'volume_type': 'gp3'}],
        'security_groups': [], 'source_dest_check': True, 'spot_instance_request_id': '',
        'subnet_id': subnet,
        'tags': {'Name': '%s-%d' % (name, index), 'Environment': 'production', 'Team': 'platform',
                 'ManagedBy': 'terraform'},
        'tags_all': {'Name': '%s-%d' % (name, index), 'Environment': 'production', 'Team': 'platform',
                     'ManagedBy': 'terraform'},
        'tenancy': 'default', 'timeouts': None, 'user_data': _hex(rng, 40),
        'user_data_base64': None, 'user_data_replace_on_change': False, 'volume_tags': None,
        'vpc_security_group_ids': ['sg-0' + _hex(rng, 16) for _ in range(rng.randrange(1, 4))],
    }


def _security_group_attributes(rng, name, index):
    sgid = 'sg-0' + _hex(rng, 16)
    rule = lambda port: {'cidr_blocks': ['10.0.0.0/8'], 'description': 'port %d' % port,
                         'from_port': port, 'ipv6_cidr_blocks': [], 'prefix_list_ids': [],
                         'protocol': 'tcp', 'security_groups': [], 'self': False, 'to_port': port}
    return {
        'arn': 'arn:aws:ec2:eu-west-1:123456789012:security-group/' + sgid,
        'description': 'Managed by Terraform',
        'egress': [{'cidr_blocks': ['0.0.0.0/0'], 'description': '', 'from_port': 0,
                    'ipv6_cidr_blocks': [], 'prefix_list_ids': [], 'protocol': '-1',
                    'security_groups': [], 'self': False, 'to_port': 0}],
        'id': sgid,
        'ingress': [rule(p) for p in rng.sample([22, 80, 443, 5432, 6379, 8080, 9090], 3)],
        'name': '%s-%d' % (name, index), 'name_prefix': '', 'owner_id': '123456789012',
        'revoke_rules_on_delete': False, 'tags': {'Name': name}, 'tags_all': {'Name': name},
        'timeouts': None, 'vpc_id': 'vpc-0' + _hex(rng, 16),
    }


def _record_attributes(rng, name, index):
    return {
        'alias': [], 'allow_overwrite': None, 'cidr_routing_policy': [], 'failover_routing_policy': [],
        'fqdn': '%s-%d.example.internal' % (name, index), 'geolocation_routing_policy': [],
        'health_check_id': '', 'id': 'Z0%s_%s-%d.example.internal_A' % (_hex(rng, 12).upper(), name, index),
        'latency_routing_policy': [], 'multivalue_answer_routing_policy': False,
        'name': '%s-%d.example.internal' % (name, index),
        'records': ['10.%d.%d.%d' % (rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))],
        'set_identifier': '', 'ttl': 300, 'type': 'A', 'weighted_routing_policy': [],
        'zone_id': 'Z0' + _hex(rng, 12).upper(),
    }


def _policy_attributes(rng, name, index):
    policy = {'Version': '2012-10-17', 'Statement': [
        {'Effect': 'Allow', 'Action': ['s3:GetObject', 's3:PutObject', 's3:ListBucket'],
         'Resource': ['arn:aws:s3:::%s-%d' % (name, index), 'arn:aws:s3:::%s-%d/*' % (name, index)]}]}
    return {'id': '%s-%d:%s-policy' % (name, index, name), 'name': '%s-policy' % name,
            'name_prefix': '', 'policy': json.dumps(policy), 'role': '%s-%d' % (name, index)}


def _null_attributes(rng, name, index):
    return {'id': str(rng.getrandbits(63)), 'triggers': {'version': _hex(rng, 8), 'name': name}}


RESOURCE_KINDS = [
    ('aws_instance', 1, _instance_attributes),
    ('aws_security_group', 1, _security_group_attributes),
    ('aws_route53_record', 0, _record_attributes),
    ('aws_iam_role_policy', 0, _policy_attributes),
    ('null_resource', 0, _null_attributes),
]


def _resource(rng, number):
    rtype, schema_version, attributes = RESOURCE_KINDS[number % len(RESOURCE_KINDS)]
    name = '%s_%d' % (rng.choice(['web', 'api', 'db', 'cache', 'worker', 'edge']), number)
    count = rng.choice([1, 1, 1, 2, 3])
    instances = []
    for index in range(count):
        instance = {'schema_version': schema_version,
                    'attributes': attributes(rng, name.replace('_', '-'), index),
                    'sensitive_attributes': []}
        if count > 1:
            instance = dict([('index_key', index)] + list(instance.items()))
        if rtype != 'null_resource':
            instance['private'] = 'eyJzY2hlbWFfdmVyc2lvbiI6IjEifQ=='
        if number > 0:
            instance['dependencies'] = ['%s.%s' % (RESOURCE_KINDS[(number - 1) % len(RESOURCE_KINDS)][0],
                                                   'dep_%d' % (number - 1))]
        instances.append(instance)
    resource = {'mode': 'managed', 'type': rtype, 'name': name, 'provider': AWS, 'instances': instances}
    if rng.random() < 0.2:
        resource = dict([('module', 'module.m%d' % (number % 17))] + list(resource.items()))
    return resource


def make_state(target_bytes, seed=1):
    """A version-4 state of about `target_bytes` (at least, within a few %),
    2-space indented like Terraform's own."""
    rng = random.Random(seed)
    state = {
        'version': 4, 'terraform_version': '1.5.7', 'serial': 42,
        'lineage': str(uuid.UUID(int=rng.getrandbits(128))),
        'outputs': {'vpc_id': {'value': 'vpc-0' + _hex(rng, 16), 'type': 'string'},
                    'db_password': {'value': _hex(rng, 24), 'type': 'string', 'sensitive': True}},
        'resources': [],
        'check_results': None,
    }
    size = len(json.dumps(state, indent=2))
    number, skipped, smallest = 0, 0, None
    while size < target_bytes and number < 10000000:
        resource = _resource(rng, number)
        number += 1
        text = json.dumps(resource, indent=2)
        # as an item of the top-level "resources" list: 4 more spaces a line, and ",\n"
        grown = len(text) + 4 * (text.count('\n') + 1) + 2
        if size + grown > target_bytes * 1.05:
            # too big to end on: look for a smaller one, then take the smallest seen
            if smallest is None or grown < smallest[0]:
                smallest = (grown, resource)
            skipped += 1
            if skipped < 50:
                continue
            grown, resource = smallest
        state['resources'].append(resource)
        size += grown
        skipped, smallest = 0, None
    return json.dumps(state, indent=2).encode('utf-8')


# --------------------------------------------------------------------------
# Workloads: each takes a server and returns a dict of figures
# --------------------------------------------------------------------------

def apply_cycles(server, envs, state, seconds, tag):
    """Each client runs LOCK, GET, POST ?ID=, UNLOCK on its own environment."""
    unexpected = []

    def client(index, start):
        connection = server.connection()
        env = '%s-%d' % (tag, index)
        latencies = []

        def cycle(timed):
            lock_id = str(uuid.uuid4())
            info = lock_info(lock_id)
            steps = [('LOCK', '/lock?env=%s' % env, info, (200,)),
                     ('GET', '/?env=%s' % env, None, (200, 204)),
                     ('POST', '/?env=%s&ID=%s' % (env, lock_id), state, (200,)),
                     ('UNLOCK', '/unlock?env=%s' % env, info, (200,))]
            for method, path, body, wanted in steps:
                status, _, took = connection.request(method, path, body)
                if status not in wanted:
                    unexpected.append((method, status))
                if timed:
                    latencies.append((method, took))

        connection.connect()
        cycle(False)                       # warm-up, and leaves a state to GET
        deadline = start() + seconds
        cycles = 0
        while time.monotonic() < deadline and cycles < 1000000:
            cycle(True)
            cycles += 1
        connection.close()
        return cycles, latencies

    run = Threads(envs, client, seconds + 120)
    cycles = sum(r[0] for r in run.results)
    timed = [t for r in run.results for t in r[1]]
    latencies = [took for _, took in timed]
    elapsed = run.ended - run.started
    if unexpected:
        raise RuntimeError('%s: unexpected statuses %s' % (server.kind, unexpected[:5]))
    figures = {'cycles/s': cycles / elapsed, 'p50 ms': percentile(latencies, 0.5) * 1000,
               'p99 ms': percentile(latencies, 0.99) * 1000, 'cycles': cycles}
    for method in ('LOCK', 'GET', 'POST', 'UNLOCK'):
        figures['%s p50 ms' % method] = percentile([t for m, t in timed if m == method], 0.5) * 1000
    return figures


def get_requests(server, clients, state, seconds, tag):
    env = tag
    setup = server.connection()
    status, _, _ = setup.request('POST', '/?env=%s' % env, state)
    setup.close()
    if status != 200:
        raise RuntimeError('%s: seeding POST answered %d' % (server.kind, status))
    bad = []

    def client(index, start):
        connection = server.connection()
        connection.connect()
        connection.request('GET', '/?env=%s' % env)
        deadline = start() + seconds
        count = 0
        latencies = []
        while time.monotonic() < deadline and count < 10000000:
            status, body, took = connection.request('GET', '/?env=%s' % env)
            if status != 200 or len(body) != len(state):
                bad.append(status)
            latencies.append(took)
            count += 1
        connection.close()
        return count, latencies

    run = Threads(clients, client, seconds + 120)
    if bad:
        raise RuntimeError('%s: bad GET answers %s' % (server.kind, bad[:5]))
    count = sum(r[0] for r in run.results)
    latencies = [t for r in run.results for t in r[1]]
    return {'requests/s': count / (run.ended - run.started),
            'p50 ms': percentile(latencies, 0.5) * 1000, 'p99 ms': percentile(latencies, 0.99) * 1000}


def big_state(server, state):
    """POST then GET one big state on a fresh server; peak memory over idle."""
    time.sleep(0.3)
    idle = server.memory('VmRSS')
    connection = server.connection(timeout=300)
    env = 'big'
    lock_id = str(uuid.uuid4())
    info = lock_info(lock_id)
    status, _, _ = connection.request('LOCK', '/lock?env=%s' % env, info)
    assert status == 200, status
    status, _, post_seconds = connection.request('POST', '/?env=%s&ID=%s' % (env, lock_id), state)
    if status != 200:
        raise RuntimeError('%s: big POST answered %d' % (server.kind, status))
    status, _, _ = connection.request('UNLOCK', '/unlock?env=%s' % env, info)
    assert status == 200, status
    after_post_hwm = server.memory('VmHWM')
    status, body, get_seconds = connection.request('GET', '/?env=%s' % env)
    if status != 200 or body != state:
        raise RuntimeError('%s: big GET answered %d with %d bytes' % (server.kind, status, len(body)))
    del body
    connection.close()
    peak = server.memory('VmHWM')
    return {'POST MB/s': len(state) / MB / post_seconds, 'GET MB/s': len(state) / MB / get_seconds,
            'POST s': post_seconds, 'GET s': get_seconds,
            'idle MB': idle / MB, 'peak MB': peak / MB, 'peak after POST MB': after_post_hwm / MB,
            'peak over idle MB': (peak - idle) / MB, 'peak over idle x state': (peak - idle) / len(state)}


def many_envs(server, count, state, tag):
    """One client: POST then GET on each of `count` new environments."""
    time.sleep(0.2)
    idle = server.memory('VmRSS')
    connection = server.connection()
    connection.connect()
    started = time.monotonic()
    deadline = started + 600
    for n in range(count):
        if time.monotonic() > deadline:
            raise RuntimeError('%s: %d environments took over 600 s' % (server.kind, count))
        env = '%s-%d' % (tag, n)
        status, _, _ = connection.request('POST', '/?env=%s' % env, state)
        if status != 200:
            raise RuntimeError('%s: POST %s answered %d' % (server.kind, env, status))
        status, body, _ = connection.request('GET', '/?env=%s' % env)
        if status != 200 or len(body) != len(state):
            raise RuntimeError('%s: GET %s answered %d' % (server.kind, env, status))
    seconds = time.monotonic() - started
    connection.close()
    return {'seconds': seconds, 'RSS after MB': server.memory('VmRSS') / MB,
            'RSS over idle MB': (server.memory('VmRSS') - idle) / MB}


def contention(server, clients, state, seconds, tag):
    """Clients fight for one lock; each checks a shared marker while it holds it."""
    env = tag
    marker_lock = threading.Lock()
    marker = {'holder': None}
    tallies = {'violations': 0, 'conflicts': 0, 'unexpected': []}

    def note_violation():
        with marker_lock:
            tallies['violations'] += 1

    def client(index, start):
        connection = server.connection()
        connection.connect()
        rng = random.Random(index)
        deadline = start() + seconds
        cycles = 0
        attempts = 0
        while time.monotonic() < deadline and attempts < 10000000:
            attempts += 1
            lock_id = str(uuid.uuid4())
            info = lock_info(lock_id)
            status, _, _ = connection.request('LOCK', '/lock?env=%s' % env, info)
            if status == 423:
                with marker_lock:
                    tallies['conflicts'] += 1
                time.sleep(rng.uniform(0.0005, 0.0015))
                continue
            if status != 200:
                tallies['unexpected'].append(('LOCK', status))
                continue
            with marker_lock:
                if marker['holder'] is not None:
                    tallies['violations'] += 1
                marker['holder'] = index
            status, _, _ = connection.request('GET', '/?env=%s' % env)
            if marker['holder'] != index:
                note_violation()
            if status not in (200, 204):
                tallies['unexpected'].append(('GET', status))
            status, _, _ = connection.request('POST', '/?env=%s&ID=%s' % (env, lock_id), state)
            if status != 200:
                # 423 or 409 here means the server thinks someone else holds it
                note_violation()
                tallies['unexpected'].append(('POST', status))
            with marker_lock:
                if marker['holder'] != index:
                    tallies['violations'] += 1
                marker['holder'] = None
            status, _, _ = connection.request('UNLOCK', '/unlock?env=%s' % env, info)
            if status != 200:
                tallies['unexpected'].append(('UNLOCK', status))
            cycles += 1
        connection.close()
        return cycles

    run = Threads(clients, client, seconds + 120)
    cycles = sum(run.results)
    if tallies['unexpected']:
        print('    %s: unexpected statuses: %s' % (server.kind, tallies['unexpected'][:5]), flush=True)
    return {'cycles/s': cycles / (run.ended - run.started), 'cycles': cycles,
            'violations': tallies['violations'], '423s': tallies['conflicts'],
            'unexpected': len(tallies['unexpected'])}


def storage_costs(data_path, state, cycles, env_count):
    """The file backend's own cost, called directly as the server calls it:
    ms per LOCK, state write and UNLOCK (history on), per state write with
    HISTORY_KEEP 0, and per first write and read of a new environment."""
    sys.path[:0] = [ROOT, os.path.join(ROOT, 'backends')]
    import tylserver
    from file_backend import FileBackend

    def constants(**settings):
        environ = dict({'TYL_FILE_DATA_PATH': data_path},
                       **{'TYL_' + key: str(value) for key, value in settings.items()})
        return tylserver.load_config(None, environ)

    metadata = {'serial': 1, 'lineage': 'bench', 'size': len(state), 'sha256': '', 'created': '',
                'lock_id': '', 'who': ''}
    totals = {'LOCK': 0.0, 'write': 0.0, 'UNLOCK': 0.0, 'write, no history': 0.0}
    shipped = constants()
    with_history = FileBackend('storage', shipped)
    without = FileBackend('storage-nohistory', constants(HISTORY_KEEP=0))
    for number in range(cycles + 20):          # the first 20 warm up
        info = lock_info(str(uuid.uuid4()))
        lock = json.loads(info)
        steps = [('LOCK', lambda: with_history.set_locked(lock, raw=info.decode(), raw_bytes=info)),
                 ('write', lambda: with_history.store_tfstate(None, raw_bytes=state, metadata=metadata,
                                                              holder_id=lock['ID'])),
                 ('UNLOCK', lambda: with_history.set_unlocked(lock, raw=info.decode(), raw_bytes=info)),
                 ('write, no history', lambda: without.store_tfstate(None, raw_bytes=state,
                                                                      metadata=metadata, holder_id=''))]
        for name, step in steps:
            started = time.perf_counter()
            step()
            if number >= 20:
                totals[name] += time.perf_counter() - started
    figures = {name: total * 1000 / cycles for name, total in totals.items()}
    started = time.perf_counter()
    for number in range(env_count):
        fresh = FileBackend('storage-new-%d' % number, shipped)
        fresh.store_tfstate(None, raw_bytes=state, metadata=metadata, holder_id='')
        with fresh.open_tfstate() as stream:
            stream.read()
    figures['new env'] = (time.perf_counter() - started) * 1000 / env_count
    return figures


def populate_file_backend(data_path, count, state):
    """Write FILE_DATA_PATH/<env>/terraform.tfstate directly, as the file backend lays it out."""
    os.makedirs(data_path, mode=0o700, exist_ok=True)
    for n in range(count):
        directory = os.path.join(data_path, 'scale-%05d' % n)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(directory, 'terraform.tfstate'), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, state)
        finally:
            os.close(fd)


def touch_envs(server, count, method, state, clients=8):
    """`clients` connections share the environments scale-00000...; one request each."""
    def client(index, start):
        connection = server.connection()
        connection.connect()
        start()
        bad = 0
        for n in range(index, count, clients):
            env = 'scale-%05d' % n
            if method == 'GET':
                status, body, _ = connection.request('GET', '/?env=%s' % env)
                bad += status != 200 or len(body) != len(state)
            else:
                status, _, _ = connection.request('POST', '/?env=%s' % env, state)
                bad += status != 200
        connection.close()
        return bad

    run = Threads(clients, client, 900)
    if sum(run.results):
        raise RuntimeError('%s: %d bad answers while touching environments' % (server.kind, sum(run.results)))
    return run.ended - run.started


# --------------------------------------------------------------------------
# Rounds, medians and the report
# --------------------------------------------------------------------------

class Bench(object):
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.rounds = args.rounds
        self.workdir = tempfile.mkdtemp(prefix='tyl-bench-')
        self.rows = []          # final table rows
        self.log_level = args.tyl_log_level
        self.backend = args.backend
        q = self.quick
        self.seconds = 0.4 if q else 3.0
        self.contention_seconds = 0.8 if q else 5.0
        self.big_bytes = (5 if q else 50) * MB
        self.env_count = 40 if q else 500
        self.scale_count = 400 if q else 10000
        self.small_state = make_state(5 * 1024, seed=7)

    # -- helpers -------------------------------------------------------------

    def alternate(self, title, run_one, fields, extra=()):
        """Run `run_one(kind, round)` for TYL then reference, `rounds` times.
        Returns {kind: {field: [per-round values]}} and prints each round."""
        print('\n## %s' % title, flush=True)
        results = {'TYL': {}, 'reference': {}}
        for number in range(1, self.rounds + 1):
            for kind in ('TYL', 'reference'):
                figures = run_one(kind, number)
                for key, value in figures.items():
                    results[kind].setdefault(key, []).append(value)
            line = '  round %d:' % number
            for field in fields:
                tyl, ref = results['TYL'][field][-1], results['reference'][field][-1]
                line += '  %s TYL %s ref %s (x%.2f)' % (field, fmt(tyl), fmt(ref), ratio(tyl, ref))
            print(line, flush=True)
        for field in list(fields) + list(extra):
            tyl, ref = results['TYL'][field], results['reference'][field]
            ratios = [ratio(a, b) for a, b in zip(tyl, ref)]
            print('  median %s: TYL %s  reference %s  TYL/ref %.2f  (per-round ratios %s)'
                  % (field, fmt(statistics.median(tyl)), fmt(statistics.median(ref)),
                     statistics.median(ratios), ' '.join('%.2f' % r for r in ratios)), flush=True)
        return results

    def row(self, workload, metric, tyl, ref, target, passed):
        self.rows.append((workload, metric, tyl, ref, target,
                          'info' if passed is None else ('PASS' if passed else 'MISS')))

    def fresh(self, kind, name, data_path=None):
        directory = os.path.join(self.workdir, name)
        if kind == 'TYL':
            return start_tyl(directory, data_path or os.path.join(directory, 'data'), self.log_level,
                             self.backend)
        return start_reference(directory)

    # -- workloads -----------------------------------------------------------

    def run_apply_and_friends(self, selected):
        servers = {'TYL': self.fresh('TYL', 'shared-tyl'), 'reference': self.fresh('reference', 'shared-ref')}
        try:
            state = self.small_state
            if 'apply' in selected:
                for clients in (1, 8):
                    title = 'apply cycle (LOCK, GET, POST ?ID=, UNLOCK), %d B state, %d client%s on %d env%s, %.1f s a round' % (
                        len(state), clients, 's' if clients > 1 else '', clients, 's' if clients > 1 else '', self.seconds)
                    res = self.alternate(title, lambda kind, n: apply_cycles(
                        servers[kind], clients, state, self.seconds, 'apply%d-r%d' % (clients, n)),
                        ['cycles/s', 'p50 ms', 'p99 ms'],
                        ['LOCK p50 ms', 'GET p50 ms', 'POST p50 ms', 'UNLOCK p50 ms'])
                    self.ratio_row(res, 'apply cycle, %d client%s' % (clients, 's' if clients > 1 else ''),
                                   'cycles/s', 0.5)
                    self.row('apply cycle, %d client%s' % (clients, 's' if clients > 1 else ''),
                             'p50 / p99 ms per request',
                             '%s / %s' % (fmt(med(res['TYL']['p50 ms'])), fmt(med(res['TYL']['p99 ms']))),
                             '%s / %s' % (fmt(med(res['reference']['p50 ms'])), fmt(med(res['reference']['p99 ms']))),
                             '', None)
            if 'get' in selected:
                title = 'GET of a %d B state, 8 clients on one env, %.1f s a round' % (len(state), self.seconds)
                res = self.alternate(title, lambda kind, n: get_requests(
                    servers[kind], 8, state, self.seconds, 'get-r%d' % n), ['requests/s', 'p50 ms', 'p99 ms'])
                self.ratio_row(res, 'GET 5 KB, 8 clients', 'requests/s', 0.8)
            if 'contention' in selected:
                title = '16 clients contending for one lock, %.1f s a round' % self.contention_seconds
                res = self.alternate(title, lambda kind, n: contention(
                    servers[kind], 16, state, self.contention_seconds, 'contend-r%d' % n),
                    ['cycles/s', 'violations', '423s'])
                self.ratio_row(res, 'contention, 16 clients 1 env', 'cycles/s', 0.5)
                violations = sum(res['TYL']['violations']) + sum(res['reference']['violations'])
                self.row('contention, 16 clients 1 env', 'lock violations (all rounds)',
                         str(sum(res['TYL']['violations'])), str(sum(res['reference']['violations'])),
                         '0', violations == 0)
        finally:
            for server in servers.values():
                server.stop()

    def run_big_state(self):
        started = time.monotonic()
        state = make_state(self.big_bytes, seed=11)
        print('\n(generated a %.1f MB version-4 state in %.1f s)' % (len(state) / MB, time.monotonic() - started),
              flush=True)

        def one(kind, number):
            server = self.fresh(kind, 'big-%s-%d' % (kind, number))
            try:
                return big_state(server, state)
            finally:
                server.stop()

        res = self.alternate('%.0f MB state: POST, GET, peak memory (fresh server each round)' % (len(state) / MB),
                             one, ['POST MB/s', 'GET MB/s', 'peak over idle MB', 'peak over idle x state'])
        label = '%.0f MB state' % (len(state) / MB)
        tyl_post = med(res['TYL']['POST MB/s'])
        self.row(label, 'POST MB/s', fmt(tyl_post), fmt(med(res['reference']['POST MB/s'])),
                 '>= 100 MB/s', tyl_post >= 100)
        self.ratio_row(res, label, 'GET MB/s', 0.7)
        tyl_x = med(res['TYL']['peak over idle x state'])
        self.row(label, 'peak RSS over idle, MB (x state)',
                 '%s (%.1fx)' % (fmt(med(res['TYL']['peak over idle MB'])), tyl_x),
                 '%s (%.1fx)' % (fmt(med(res['reference']['peak over idle MB'])),
                                 med(res['reference']['peak over idle x state'])),
                 '<= 3x state', tyl_x <= 3)

    def run_many_envs(self):
        state = self.small_state

        def one(kind, number):
            server = self.fresh(kind, 'envs-%s-%d' % (kind, number))
            try:
                return many_envs(server, self.env_count, state, 'many-r%d' % number)
            finally:
                server.stop()

        res = self.alternate('%d environments, one POST and one GET each, 1 client (fresh server each round)'
                             % self.env_count, one, ['seconds', 'RSS after MB'])
        label = '%d envs, POST+GET each' % self.env_count
        tyl, ref = res['TYL']['seconds'], res['reference']['seconds']
        r = med([ratio(a, b) for a, b in zip(tyl, ref)])
        self.row(label, 'seconds', fmt(med(tyl)), fmt(med(ref)), '<= 3x ref (x%.2f)' % r, r <= 3)
        self.row(label, 'RSS after, MB', fmt(med(res['TYL']['RSS after MB'])),
                 fmt(med(res['reference']['RSS after MB'])), '', None)

    def run_scale(self):
        state = self.small_state
        data_path = os.path.join(self.workdir, 'scale-data')
        started = time.monotonic()
        populate_file_backend(data_path, self.scale_count, state)
        print('\n(wrote %d environments of %d B into %s in %.1f s)'
              % (self.scale_count, len(state), data_path, time.monotonic() - started), flush=True)

        def one(kind, number):
            server = self.fresh(kind, 'scale-%s-%d' % (kind, number), data_path=data_path)
            try:
                startup = server.startup
                time.sleep(0.2)
                idle = server.memory('VmRSS')
                seconds = touch_envs(server, self.scale_count, 'GET' if kind == 'TYL' else 'POST', state)
                rss = server.memory('VmRSS')
                return {'start-up s': startup, 'touch s': seconds, 'idle MB': idle / MB, 'RSS after MB': rss / MB}
            finally:
                server.stop()

        res = self.alternate('%d environments: start-up, then one GET each (TYL, from disk) / one POST each '
                             '(reference, in memory), 8 clients' % self.scale_count,
                             one, ['start-up s', 'touch s', 'RSS after MB'])
        label = '%d envs' % self.scale_count
        startup = med(res['TYL']['start-up s'])
        self.row(label, 'start-up s (process start to listening)', fmt(startup),
                 fmt(med(res['reference']['start-up s'])), '< 1 s', startup < 1)
        rss = med(res['TYL']['RSS after MB'])
        self.row(label, 'RSS MB after one GET each (ref: after POSTs)', fmt(rss),
                 fmt(med(res['reference']['RSS after MB'])), '< 100 MB', rss < 100)

    def run_storage(self):
        data_path = os.path.join(self.workdir, 'storage-data')
        cycles = 40 if self.quick else 400
        print('\n## the file backend alone, %d cycles in %s' % (cycles, data_path), flush=True)
        figures = storage_costs(data_path, self.small_state, cycles, self.env_count)
        print('  ' + '  '.join('%s %.3f ms' % item for item in figures.items()), flush=True)
        cycle = figures['LOCK'] + figures['write'] + figures['UNLOCK']
        self.row('file backend alone', 'LOCK / write / UNLOCK ms', '%s / %s / %s' % (
            fmt(figures['LOCK']), fmt(figures['write']), fmt(figures['UNLOCK'])), '', '', None)
        self.row('file backend alone', 'cycle ms (no history)', '%s (%s)' % (
            fmt(cycle), fmt(cycle - figures['write'] + figures['write, no history'])), '', '', None)
        self.row('file backend alone', 'new env: first write + read ms', fmt(figures['new env']),
                 '', '', None)

    def ratio_row(self, res, workload, field, target):
        tyl, ref = res['TYL'][field], res['reference'][field]
        r = med([ratio(a, b) for a, b in zip(tyl, ref)])
        self.row(workload, field, fmt(med(tyl)), fmt(med(ref)), '>= %gx ref (x%.2f)' % (target, r), r >= target)

    # -- all -------------------------------------------------------------------

    def run(self, selected):
        print('# TYL benchmark: %s, Python %s, %d CPUs, %s%s, %d round%s, TYL on %s, LOG_LEVEL %s'
              % (time.strftime('%Y-%m-%d %H:%M'), platform.python_version(), os.cpu_count(),
                 platform.system(), ' ' + platform.release(), self.rounds, 's' if self.rounds > 1 else '',
                 BACKENDS[self.backend][0], self.log_level), flush=True)
        if self.quick:
            print('# --quick: reduced sizes and durations; not figures for the README', flush=True)
        print('# work directory %s' % self.workdir, flush=True)
        if {'apply', 'get', 'contention'} & selected:
            self.run_apply_and_friends(selected)
        if 'bigstate' in selected:
            self.run_big_state()
        if 'envs' in selected:
            self.run_many_envs()
        if 'scale' in selected:
            self.run_scale()
        if 'storage' in selected:
            self.run_storage()
        self.print_table()

    def print_table(self):
        header = ('Workload', 'Figure', 'TYL', 'Reference', 'Target', 'Result')
        rows = [header] + self.rows
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
        print('\n## Summary (medians of %d round%s; ratios are medians of per-round TYL/reference)\n'
              % (self.rounds, 's' if self.rounds > 1 else ''))
        for number, r in enumerate(rows):
            print('| ' + ' | '.join(str(c).ljust(w) for c, w in zip(r, widths)) + ' |')
            if number == 0:
                print('|' + '|'.join('-' * (w + 2) for w in widths) + '|')
        misses = sum(1 for r in self.rows if r[5] == 'MISS')
        print('\n%d PASS, %d MISS' % (sum(1 for r in self.rows if r[5] == 'PASS'), misses), flush=True)


def med(values):
    return statistics.median(values)


def ratio(a, b):
    return a / b if b else float('inf') if a else 1.0


def fmt(value):
    if isinstance(value, int):
        return str(value)
    if value != value:
        return 'nan'
    if abs(value) >= 100:
        return '%.0f' % value
    if abs(value) >= 10:
        return '%.1f' % value
    if abs(value) >= 1:
        return '%.2f' % value
    return '%.3f' % value


def main(argv=None):
    parser = argparse.ArgumentParser(description='Benchmark TYL against an in-memory stdlib reference server.')
    parser.add_argument('--rounds', type=int, default=3, help='rounds per workload (default 3)')
    parser.add_argument('--quick', action='store_true', help='small sizes and short rounds: a ~30 s smoke run')
    parser.add_argument('--only', metavar='WORKLOAD',
                        help='comma-separated subset of: %s (default: all, but scale and '
                             'storage on a backend other than file)' % ', '.join(WORKLOADS))
    parser.add_argument('--tyl-log-level', default='INFO',
                        help="TYL's LOG_LEVEL (default INFO, as shipped: one access line per request)")
    parser.add_argument('--backend', choices=sorted(BACKENDS), default='file',
                        help="TYL's store (default file, as shipped); the scale and storage "
                             'workloads run on file only')
    parser.add_argument('--keep', action='store_true', help='keep the temporary work directory')
    parser.add_argument('--reference-server', metavar='PORT', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reference_server is not None:
        return run_reference_server(args.reference_server)
    if args.only is None:
        selected = set(WORKLOADS) - (FILE_ONLY if args.backend != 'file' else set())
    else:
        selected = set(w.strip() for w in args.only.split(',') if w.strip())
    unknown = selected - set(WORKLOADS)
    if unknown or not selected:
        parser.error('--only takes %s, not %s' % (', '.join(WORKLOADS), ', '.join(sorted(unknown)) or 'nothing'))
    if args.backend != 'file' and FILE_ONLY & selected:
        parser.error('%s work on the file backend only: leave them out of --only'
                     % ', '.join(sorted(FILE_ONLY)))
    if args.rounds < 1 or args.rounds > 50:
        parser.error('--rounds must be 1 to 50')
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    bench = Bench(args)
    started = time.monotonic()
    try:
        bench.run(selected)
    finally:
        _kill_all()
        if args.keep:
            print('kept %s' % bench.workdir)
        else:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    print('(total %.0f s)' % (time.monotonic() - started))
    return 0


if __name__ == '__main__':
    sys.exit(main())
