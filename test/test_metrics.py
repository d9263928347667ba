"""GET /metrics: the Prometheus text format, its counters, and who may read it."""

import math
import re

from test_http import BOOM_BACKEND, STATE, lock, lock_info, req, unlock, write, write_plugin
from test_security import as_user, hashes, secured  # noqa: F401 (fixtures)

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'
SECRET_ENV = 'secret-app-4711'
OTHER_ENV = 'hidden-net-0815'

# A post-processor that fails on every event: each failure is one error.
FAILING_POST_PROCESSOR = '''
import tylstore


class Failing(tylstore.TYLNonpersistent):
    def __init__(self, environment, constants, **kwargs):
        pass

    def on_locked(self, state_obj, **kwargs):
        raise RuntimeError('lock event lost')

    def on_unlocked(self, state_obj, **kwargs):
        raise RuntimeError('unlock event lost')

    def process_tfstate(self, tfstate_obj, **kwargs):
        raise RuntimeError('state event lost')
'''

NAME = r'[a-zA-Z_:][a-zA-Z0-9_:]*'
HELP = re.compile(r'# HELP (%s) \S.*' % NAME)
TYPE = re.compile(r'# TYPE (%s) (counter|gauge|histogram)' % NAME)
SAMPLE = re.compile(r'(%s)(?:\{((?:%s="[^"\\\n]*",?)*)\})? (\S+)' % (NAME, NAME))
LABEL = re.compile(r'(%s)="([^"]*)"' % NAME)


def parse(text):
    """{(name, ((label, value), ...)): value}, checking every line: each is
    # HELP, # TYPE, or a sample of a family whose TYPE came before it."""
    assert text.endswith('\n') and '\n\n' not in text
    types, helped, samples = {}, set(), {}
    for line in text.splitlines():
        if line.startswith('# HELP'):
            found = HELP.fullmatch(line)
            assert found and found.group(1) not in helped, line
            helped.add(found.group(1))
            continue
        if line.startswith('# TYPE'):
            found = TYPE.fullmatch(line)
            assert found and found.group(1) not in types, line
            types[found.group(1)] = found.group(2)
            continue
        found = SAMPLE.fullmatch(line)
        assert found, line
        name, labels, value = found.groups()
        family = re.sub(r'_(bucket|sum|count)$', '', name)
        if types.get(family) != 'histogram':
            family = name
        assert family in types and family in helped, line
        key = (name, tuple(LABEL.findall(labels or '')))
        assert key not in samples, line
        samples[key] = float(value)
    for name, kind in types.items():
        if kind == 'histogram':
            check_histogram(samples, name)
    return samples


def check_histogram(samples, name):
    buckets = sorted((float(labels[0][1]), value) for (sample, labels), value in samples.items()
                     if sample == name + '_bucket')
    assert buckets and buckets[-1][0] == math.inf
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), 'buckets must be cumulative'
    assert counts[-1] == samples[(name + '_count', ())]
    assert samples[(name + '_sum', ())] >= 0


def scrape(server, **headers):
    status, response_headers, data = req(server, 'GET', '/metrics', headers=headers)
    assert status == 200, data
    assert response_headers['Content-Type'] == CONTENT_TYPE
    return data.decode('utf-8'), parse(data.decode('utf-8'))


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0)


def test_counters_follow_a_run_with_a_conflict_and_a_force_unlock(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'failing_post_processor', FAILING_POST_PROCESSOR)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins,
                         POST_PROCESS_CLASSES=['failing_post_processor.Failing']).start()
    assert lock(server, SECRET_ENV, lock_info('L1'))[0] == 200
    assert lock(server, SECRET_ENV, lock_info('L2'))[0] == 423
    assert write(server, SECRET_ENV, STATE, 'L1')[0] == 200
    assert lock(server, OTHER_ENV, lock_info('L3'))[0] == 200
    assert unlock(server, SECRET_ENV, b'')[0] == 200
    assert req(server, 'GET', '/?env=' + SECRET_ENV)[0] == 200

    text, samples = scrape(server)
    assert SECRET_ENV not in text and OTHER_ENV not in text
    requests = {labels: count for (name, labels), count in samples.items()
                if name == 'tyl_requests_total'}
    assert requests == {
        (('method', 'GET'), ('status', '200')): 1,
        (('method', 'LOCK'), ('status', '200')): 2,
        (('method', 'LOCK'), ('status', '423')): 1,
        (('method', 'POST'), ('status', '200')): 1,
        (('method', 'UNLOCK'), ('status', '200')): 1,
    }
    assert value(samples, 'tyl_request_duration_seconds_count') == 6
    assert value(samples, 'tyl_locks_held') == 1
    assert value(samples, 'tyl_lock_conflicts_total') == 1
    assert value(samples, 'tyl_force_unlocks_total') == 1
    assert value(samples, 'tyl_state_writes_total') == 1
    assert value(samples, 'tyl_state_write_bytes_total') == len(STATE)
    assert value(samples, 'tyl_backend_errors_total') == 0
    # on_locked twice, process_tfstate, on_unlocked of the force-unlock.
    assert value(samples, 'tyl_post_processor_errors_total') == 4

    # The first scrape is counted in the next one; releasing the other lock
    # and unlocking a free one (a retry) leave no lock held, never below 0.
    assert unlock(server, OTHER_ENV, lock_info('L3'))[0] == 200
    assert unlock(server, OTHER_ENV, lock_info('L3'))[0] == 200
    _, samples = scrape(server)
    assert value(samples, 'tyl_requests_total', method='GET', status='200') == 2
    assert value(samples, 'tyl_requests_total', method='UNLOCK', status='200') == 3
    assert value(samples, 'tyl_request_duration_seconds_count') == 9
    assert value(samples, 'tyl_locks_held') == 0
    assert value(samples, 'tyl_force_unlocks_total') == 1


def test_a_fresh_server_shows_every_family_at_zero(tyl_server):
    text, samples = scrape(tyl_server)
    for name in ('tyl_locks_held', 'tyl_lock_conflicts_total', 'tyl_force_unlocks_total',
                 'tyl_state_writes_total', 'tyl_state_write_bytes_total',
                 'tyl_backend_errors_total', 'tyl_post_processor_errors_total',
                 'tyl_request_duration_seconds_count'):
        assert samples[(name, ())] == 0, name
    assert '# TYPE tyl_requests_total counter' in text
    assert '# TYPE tyl_request_duration_seconds histogram' in text
    assert req(tyl_server, 'POST', '/metrics', b'')[0] == 405


def test_backend_errors_and_unknown_methods_are_counted_without_new_labels(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'boom_backend', BOOM_BACKEND)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, BACKEND_CLASS='boom_backend.BoomBackend').start()
    assert req(server, 'GET', '/?env=app')[0] == 500
    assert req(server, 'BREW', '/?env=app')[0] == 405
    assert req(server, 'PROPFIND', '/')[0] == 405
    _, samples = scrape(server)
    assert value(samples, 'tyl_backend_errors_total') == 1
    assert value(samples, 'tyl_requests_total', method='GET', status='500') == 1
    assert value(samples, 'tyl_requests_total', method='other', status='405') == 2
    assert {dict(labels)['method'] for (name, labels) in samples if name == 'tyl_requests_total'} \
        == {'GET', 'other'}


def test_metrics_need_a_user_but_no_rights_when_authentication_is_on(secured):
    status, headers, data = as_user(secured, None, 'GET', '/metrics')
    assert status == 401 and headers['WWW-Authenticate'].startswith('Basic realm="TYL"')
    assert as_user(secured, 'dave', 'GET', '/metrics')[0] == 200   # in no rule
    assert as_user(secured, 'bob', 'GET', '/state')[0] == 403
    status, headers, data = as_user(secured, 'bob', 'GET', '/metrics')
    assert status == 200 and headers['Content-Type'] == CONTENT_TYPE
    samples = parse(data.decode('utf-8'))
    assert value(samples, 'tyl_requests_total', method='GET', status='401') == 1
    assert value(samples, 'tyl_requests_total', method='GET', status='403') == 1
    assert value(samples, 'tyl_requests_total', method='GET', status='200') == 1
