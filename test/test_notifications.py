"""Notifications: the Slack and webhook post-processors, through the real server.

A receiver on 127.0.0.1 (a ThreadingHTTPServer in a thread of the test)
stands in for Slack or a webhook consumer.  It records every POST, and can
answer with any status or never answer at all.  Whatever it does, Terraform's
requests must be answered at once and as usual.  Every wait is bounded.
"""

import hashlib
import hmac
import http.server
import json
import re
import signal
import threading
import time

import pytest

import tylserver
from test_http import STATE, STATE2, lock, lock_info, req, unlock, write

SLACK = 'slack_notify_post_processor.SlackNotifyPostProcessor'
WEBHOOK = 'webhook_post_processor.WebhookPostProcessor'
SECRET = 'shared-secret-for-tests'
# Short timeouts and delays, so that the retries of a test take a second or two.
QUICK = {'NOTIFY_TIMEOUT': 0.3, 'NOTIFY_ATTEMPTS': 2, 'NOTIFY_RETRY_DELAY': 0.05}

HOSTS_STATE = json.dumps({
    'version': 4, 'serial': 3, 'lineage': 'lin-1', 'outputs': {},
    'resources': [{'mode': 'managed', 'type': 'aws_instance', 'name': 'web', 'instances': [
        {'attributes': {'private_dns': 'ip-10-0-0-1.internal'}},
        {'attributes': {'private_dns': 'ip-10-0-0-2.internal'}}]}],
}).encode('utf-8')


class Receiver(object):
    """Records each POST as (path, headers, body, arrival time).

    It answers `status`, after `delay` seconds, or with `status=None` never
    answers: the request hangs until the receiver is closed (at most 30 s).
    """

    def __init__(self, status=200, delay=0):
        self.posts = []
        self.arrived = threading.Condition()
        self.released = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers['Content-Length']))
                with receiver.arrived:
                    receiver.posts.append((self.path, self.headers, body, time.monotonic()))
                    receiver.arrived.notify_all()
                if status is None:
                    receiver.released.wait(30)
                    return
                time.sleep(delay)
                self.send_response(status)
                self.send_header('Content-Length', '0')
                self.end_headers()

            def log_message(self, format, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = 'http://127.0.0.1:%d/hook' % self.server.server_address[1]

    def wait_for(self, count, timeout=10):
        """The first `count` posts, once they have arrived."""
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.posts) >= count, timeout), self.posts
            return list(self.posts)

    def close(self):
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(status=200, delay=0):
        made.append(Receiver(status, delay))
        return made[-1]

    yield make
    for each in made:
        each.close()


def at_once(call, *args):
    """A Terraform-facing request: it must not wait for any receiver."""
    started = time.monotonic()
    result = call(*args)
    assert time.monotonic() - started < 1, 'answered after %.2f s' % (time.monotonic() - started)
    return result


def post_processors(server):
    """Environment name -> its one post-processor's entry in GET /state."""
    document = json.loads(at_once(req, server, 'GET', '/state')[2])
    return {e['environment_name']: e['post_processors'][0] for e in document['environments']}


def eventually(condition, timeout=15, step=0.05):
    """Poll `condition` until it is true; at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step)):
        if condition() or time.monotonic() > deadline:
            break
        time.sleep(step)
    assert condition()


def signed(body):
    """Verify X-TYL-Signature as the README tells a receiver to."""
    return 'sha256=' + hmac.new(SECRET.encode('utf-8'), body, hashlib.sha256).hexdigest()


# --------------------------------------------------------------------------
# Slack
# --------------------------------------------------------------------------

def test_slack_messages_for_lock_write_and_unlock(tyl_factory, receiver):
    slack = receiver()
    server = tyl_factory(POST_PROCESS_CLASSES=[SLACK], SLACK_WEBHOOK_URI=slack.url,
                         SLACK_NOTIFY_USER_IMAGE_URI='https://example.com/tyl.png',
                         HELPER_HOSTNAME_QUERY_MAP={'aws_instance': 'private_dns'}).start()
    holder = lock_info('L1', who='<!channel> & bob')
    assert at_once(lock, server, 'app', holder)[0] == 200
    assert at_once(write, server, 'app', HOSTS_STATE, 'L1')[0] == 200
    assert at_once(unlock, server, 'app', holder)[0] == 200
    posts = slack.wait_for(3)
    assert [path for path, _, _, _ in posts] == ['/hook'] * 3
    assert {headers['Content-Type'] for _, headers, _, _ in posts} == {'application/json'}
    payloads = [json.loads(body) for _, _, body, _ in posts]
    assert {(p['username'], p['icon_url']) for p in payloads} == {('TYL', 'https://example.com/tyl.png')}
    who = '&lt;!channel&gt; &amp; bob'  # escaped: no @channel mention
    assert [p['text'] for p in payloads] == [
        '_Environment app:_ *LOCKED* :lock:\n_Who:_ *%s*\n_Operation:_ *OperationTypeApply*\n'
        '_Version:_ 1.0.3\n_ID:_ L1' % who,
        '_Environment app:_ Created Hosts :lock_with_ink_pen:\nip-10-0-0-1.internal, ip-10-0-0-2.internal',
        '_Environment app:_ *Unlock* :unlock:\n_Who:_ *%s*\n_ID:_ L1' % who,
    ]
    eventually(lambda: post_processors(server)['app']['post_processor_status']['queue']['delivered'] == 3)
    assert post_processors(server)['app']['num_errors_logged'] == 0


def test_slack_tells_only_the_listed_operations_and_names_force_unlock(tyl_factory, receiver):
    slack = receiver()
    server = tyl_factory(POST_PROCESS_CLASSES=[SLACK], SLACK_WEBHOOK_URI=slack.url,
                         SLACK_NOTIFY_UNLOCK_FORMAT='{Who} released {ID}').start()
    plan = lock_info('P1').replace(b'OperationTypeApply', b'OperationTypePlan')
    assert at_once(lock, server, 'app', plan)[0] == 200
    assert at_once(write, server, 'app', STATE, 'P1')[0] == 200  # no hosts: no message
    assert at_once(unlock, server, 'app', plan)[0] == 200
    assert at_once(lock, server, 'app', lock_info('A1'))[0] == 200
    assert at_once(unlock, server, 'app', b'')[0] == 200
    # Delivery is in order, so the first message shows nothing came before.
    texts = [json.loads(body)['text'] for _, _, body, _ in slack.wait_for(2)]
    assert texts[0].startswith('_Environment app:_ *LOCKED* :lock:\n') and 'A1' in texts[0]
    assert texts[1] == '_Environment app:_ *Force-unlock* :unlock:\nalice@ci-01 released A1'
    assert 'icon_url' not in json.loads(slack.posts[0][2])


# --------------------------------------------------------------------------
# Webhook
# --------------------------------------------------------------------------

def test_webhook_events_are_complete_and_signed(tyl_factory, receiver):
    hook = receiver()
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url,
                         WEBHOOK_SECRET=SECRET).start()
    assert at_once(lock, server, 'app', lock_info('L1'))[0] == 200
    assert at_once(write, server, 'app', STATE, 'L1')[0] == 200
    assert at_once(unlock, server, 'app', lock_info('L1'))[0] == 200
    assert at_once(lock, server, 'app', lock_info('L2', who='carol@ci-02'))[0] == 200
    assert at_once(unlock, server, 'app', b'')[0] == 200
    assert at_once(write, server, 'app', STATE2)[0] == 200
    posts = hook.wait_for(6)
    for _, headers, body, _ in posts:
        assert hmac.compare_digest(signed(body), headers['X-TYL-Signature'])
        assert not hmac.compare_digest(signed(body + b' '), headers['X-TYL-Signature'])
        assert headers['Content-Type'] == 'application/json'
    events = [json.loads(body) for _, _, body, _ in posts]
    assert [(e['action'], e['lock_id'], e['who']) for e in events] == [
        ('lock', 'L1', 'alice@ci-01'), ('write', 'L1', 'alice@ci-01'), ('unlock', 'L1', 'alice@ci-01'),
        ('lock', 'L2', 'carol@ci-02'), ('force-unlock', 'L2', 'carol@ci-02'), ('write', None, None)]
    common = {'event_id', 'environment', 'action', 'lock_id', 'who', 'operation', 'time'}
    for event in events:
        assert set(event) == (common | {'serial', 'lineage'} if event['action'] == 'write' else common)
        assert event['environment'] == 'app'
        assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', event['time'])
    assert [e['operation'] for e in events] == ['OperationTypeApply'] * 5 + [None]
    assert [(e['serial'], e['lineage']) for e in events if e['action'] == 'write'] == [
        (1, '3f0b9c8e-1111-2222-3333-444455556666'), (2, '3f0b9c8e-1111-2222-3333-444455556666')]
    assert len({e['event_id'] for e in events}) == 6


# --------------------------------------------------------------------------
# Receivers that fail
# --------------------------------------------------------------------------

def test_a_hanging_receiver_never_delays_terraform(tyl_factory, receiver):
    hook = receiver(status=None)
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url, **QUICK).start()
    assert at_once(lock, server, 'app', lock_info('L1'))[0] == 200
    assert at_once(write, server, 'app', STATE, 'L1')[0] == 200
    assert at_once(unlock, server, 'app', lock_info('L1'))[0] == 200
    eventually(lambda: post_processors(server)['app']['num_errors_logged'] == 3)
    processor = post_processors(server)['app']
    assert 'after 2 attempt(s)' in processor['recent_logged_error']
    assert 'timed out' in processor['recent_logged_error']
    assert processor['post_processor_status']['queue'] == {
        'queued': 0, 'delivered': 0, 'failed': 3, 'dropped': 0}
    assert len(hook.posts) == 6


@pytest.mark.parametrize('status, attempts', [(500, 3), (429, 3), (404, 1)])
def test_an_error_answer_is_retried_with_backoff_then_counted(tyl_factory, receiver, status, attempts):
    hook = receiver(status)
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url,
                         NOTIFY_ATTEMPTS=3, NOTIFY_RETRY_DELAY=0.2).start()
    assert at_once(lock, server, 'app', lock_info('L1'))[0] == 200
    eventually(lambda: post_processors(server)['app']['num_errors_logged'] == 1)
    processor = post_processors(server)['app']
    assert processor['recent_logged_error'].startswith(
        'delivery failed after %d attempt(s): HTTPError: HTTP Error %d' % (attempts, status))
    arrivals = [arrived for _, _, _, arrived in hook.posts]
    assert len(arrivals) == attempts
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    for gap, delay in zip(gaps, [0.2, 0.4]):  # exponential: 0.2 s, then 0.4 s
        assert delay * 0.9 <= gap < delay + 0.5, gaps
    assert at_once(unlock, server, 'app', lock_info('L1'))[0] == 200


def test_the_queue_stays_bounded_under_a_flood(tyl_factory, receiver):
    hook = receiver(status=None)
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url, NOTIFY_QUEUE_SIZE=3,
                         NOTIFY_ATTEMPTS=1, NOTIFY_TIMEOUT=0.5).start()
    environments = ['e%d' % n for n in range(4)]
    for cycle in range(5):
        for env in environments:
            holder = lock_info('%s-%d' % (env, cycle))
            assert at_once(lock, server, env, holder)[0] == 200
            assert at_once(unlock, server, env, holder)[0] == 200
    queue = post_processors(server)['e0']['post_processor_status']['queue']
    assert queue['queued'] <= 3
    assert queue['dropped'] >= 40 - 3 - 2  # at most two taken by the worker meanwhile

    def every_event_accounted_for():
        entries = post_processors(server)
        return sum(e['num_errors_logged'] for e in entries.values()) == 40

    eventually(every_event_accounted_for)
    entries = post_processors(server)
    queue = entries['e0']['post_processor_status']['queue']
    assert queue['queued'] == queue['delivered'] == 0
    assert queue['dropped'] + queue['failed'] == 40
    assert len(hook.posts) == queue['failed']
    assert 'dropped: the WebhookPostProcessor queue of 3 was full' in [
        e['recent_logged_error'] for e in entries.values()]


def test_a_notifier_without_its_url_fails_to_start_and_terraform_goes_on(tyl_factory):
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK, SLACK]).start()
    assert at_once(lock, server, 'app', lock_info('L1'))[0] == 200
    document = json.loads(req(server, 'GET', '/state')[2])
    (app,) = document['environments']
    assert [p['recent_logged_error'] for p in app['post_processors']] == [
        'failed to start: ValueError: WEBHOOK_URL is not set',
        'failed to start: ValueError: SLACK_WEBHOOK_URI is not set']


# --------------------------------------------------------------------------
# Stopping
# --------------------------------------------------------------------------

def stop_within_10_s(server):
    """SIGTERM, as systemd sends it, and a clean exit within 10 s."""
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(10) == 0
    assert time.monotonic() - started < 10


def test_sigterm_delivers_the_notifications_queued_to_a_slow_receiver(tyl_factory, receiver):
    hook = receiver(delay=0.5)
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url).start()
    for n in range(4):
        holder = lock_info('L%d' % n)
        assert at_once(lock, server, 'app', holder)[0] == 200
        assert at_once(unlock, server, 'app', holder)[0] == 200
    assert len(hook.posts) < 8          # most still queued at the signal
    stop_within_10_s(server)
    events = [json.loads(body) for _, _, body, _ in hook.wait_for(8, timeout=0)]
    assert [(e['action'], e['lock_id']) for e in events] == [
        (action, 'L%d' % n) for n in range(4) for action in ('lock', 'unlock')]
    assert 'undelivered' not in server.log()


def test_a_hanging_receiver_does_not_hold_up_the_exit(tyl_factory, receiver):
    hook = receiver(status=None)
    server = tyl_factory(POST_PROCESS_CLASSES=[WEBHOOK], WEBHOOK_URL=hook.url,
                         NOTIFY_TIMEOUT=60).start()
    assert at_once(lock, server, 'app', lock_info('L1'))[0] == 200
    assert at_once(unlock, server, 'app', lock_info('L1'))[0] == 200
    hook.wait_for(1)                    # the first hangs, the second waits behind it
    stop_within_10_s(server)
    assert 'stopped with 2 notification(s) undelivered' in server.log()


# --------------------------------------------------------------------------
# Configuration and the shared queue, in this process
# --------------------------------------------------------------------------

@pytest.mark.parametrize('key, value', [
    ('WEBHOOK_URL', 'ftp://example.com/hook'),
    ('WEBHOOK_URL', 'http://[::1/hook'),
    ('SLACK_WEBHOOK_URI', 'hooks.slack.com/services/T000/B000/secret'),
    ('SLACK_NOTIFY_USER_IMAGE_URI', 'https:// example.com/x.png'),
    ('SLACK_NOTIFY_FORMAT', '{Who'),
    ('SLACK_NOTIFY_HOST_LIST', 'yes'),
    ('NOTIFY_ATTEMPTS', 11),
    ('NOTIFY_TIMEOUT', 0),
    ('NOTIFY_QUEUE_SIZE', 0),
])
def test_a_bad_notification_key_is_refused_without_echoing_a_url(key, value):
    with pytest.raises(tylserver.ConfigError, match=key) as refused:
        tylserver.load_config(environ={'TYL_' + key: json.dumps(value)})
    assert 'secret' not in str(refused.value)


def test_post_processors_of_many_environments_share_one_thread():
    constants = tylserver.load_config(environ={'TYL_WEBHOOK_URL': 'http://127.0.0.1:9/unused',
                                               'TYL_POST_PROCESS_CLASSES': WEBHOOK})
    (webhook,) = tylserver.load_plugins(constants).post_process_classes
    threads = threading.active_count()
    processors = [webhook('env%d' % n, constants) for n in range(500)]
    assert threading.active_count() - threads <= 1
    assert len({id(p.queue) for p in processors}) == 1
