"""The dashboard (/ui): its pages, who may see and do what, its CSRF
protection, through the real server process, and then in a real headless
Chromium driven through chromedriver.

The browser tests need Debian's chromium and chromium-driver.  Without
them they skip, unless TYL_REQUIRE_BROWSER=1 (CI sets it): then they fail.
The diff seen in the browser comes from two real Terraform 1.0.3 applies
(see test_terraform.py).
"""

import html
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from urllib.parse import urlencode

import pytest

import test_security
import test_terraform
import tylserver
from test_admin import AUDIT, audit_lines
from test_history import replace_state_file
from test_history_cli import configured, run
from test_http import holder_of, lock, lock_info, write, write_plugin
from test_metrics import scrape, value
from test_security import PASSWORDS, as_user, auth_config, credentials
from test_terraform import counted_resources, history
from test_terraform_security import secure_backend

# Fixtures of other modules, bound here so that pytest finds them.
hashes = test_security.hashes
secured = test_security.secured
tf = test_terraform.tf
tf_env = test_terraform.tf_env

CHROMIUM = '/usr/bin/chromium'
CHROMEDRIVER = '/usr/bin/chromedriver'
CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
FORM = {'Content-Type': 'application/x-www-form-urlencoded'}
HTML = 'text/html; charset=utf-8'
SCRIPT = '<script>alert(1)</script>'


def v4_state(serial, resources, lineage='lineage-v4'):
    return json.dumps({'version': 4, 'terraform_version': '1.0.3', 'serial': serial,
                       'lineage': lineage, 'outputs': {}, 'resources': resources},
                      indent=2).encode('utf-8')


def v4_resource(name, instances, module=None, mode='managed', kind='null_resource'):
    """A version-4 resource; `instances` maps index key (None: none) to attributes."""
    resource = {'mode': mode, 'type': kind, 'name': name, 'provider': 'provider["null"]',
                'instances': [dict({'schema_version': 0, 'attributes': attributes},
                                   **({} if key is None else {'index_key': key}))
                              for key, attributes in instances.items()]}
    if module:
        resource['module'] = module
    return resource


def v3_state(serial, modules):
    """A version-3 state; `modules` maps a module path to {key: primary attributes}."""
    return json.dumps({'version': 3, 'terraform_version': '0.11.11', 'serial': serial,
                       'lineage': 'lineage-v3', 'modules': [
                           {'path': list(path), 'outputs': {}, 'depends_on': [], 'resources': {
                               key: {'type': key.split('.')[0], 'depends_on': [],
                                     'primary': {'id': attributes['id'], 'attributes': attributes}}
                               for key, attributes in resources.items()}}
                           for path, resources in modules.items()]},
                      indent=2).encode('utf-8')


# --------------------------------------------------------------------------
# reading the pages
# --------------------------------------------------------------------------

def get_page(server, path, user=None):
    """(status, headers, text) of a GET, as `user` when given."""
    if user is None:
        status, headers, body = server.request('GET', path)
    else:
        status, headers, body = as_user(server, user, 'GET', path)
    return status, headers, body.decode('utf-8')


def overview(text):
    """{environment: [cell texts after the name]} of the /ui table."""
    rows = re.findall(r'<tr><td><a href="/ui/env\?env=[^"]*">([^<]*)</a></td>(.*?)</tr>', text)
    return {html.unescape(name): [html.unescape(re.sub(r'<[^>]*>', '', cell))
                                  for cell in re.findall(r'<td[^>]*>(.*?)</td>', cells)]
            for name, cells in rows}


def listed(text, kind):
    """The addresses in the comparison's list `kind` (added, removed, changed)."""
    section = re.search(r'<section id="%s">(.*?)</section>' % kind, text).group(1)
    return [html.unescape(item) for item in re.findall(r'<li>(.*?)</li>', section)]


def form_token(text):
    found = re.search(r'<input type="hidden" name="csrf_token" value="([0-9a-f]+)">', text)
    return found.group(1) if found else None


def post_force_unlock(server, user, env, fields, headers=None):
    """POST the force-unlock form as `user` (None: without credentials)."""
    body = urlencode(fields).encode('ascii')
    return as_user(server, user, 'POST', '/ui/force-unlock?env=' + env, body,
                   dict(FORM, **(headers or {})))


def assert_dashboard_headers(headers):
    assert headers['Cache-Control'] == 'no-store'
    assert headers['Content-Security-Policy'] == CSP
    assert headers['X-Frame-Options'] == 'DENY'
    assert headers['Referrer-Policy'] == 'no-referrer'
    assert headers['X-Content-Type-Options'] == 'nosniff'


# --------------------------------------------------------------------------
# the pages, without authentication
# --------------------------------------------------------------------------

def test_overview_lists_each_environment_with_its_lock_and_state(tyl_factory):
    server = tyl_factory().start()
    assert server.request('GET', '/health')[0] == 200
    holder = json.dumps({'ID': 'L-1', 'Operation': 'OperationTypeApply', 'Info': '', 'Who': SCRIPT,
                         'Version': '1.0.3', 'Path': '',
                         'Created': time.strftime('%Y-%m-%dT%H:%M:%S.123456789Z',
                                                  time.gmtime(time.time() - 185))}).encode()
    assert lock(server, 'app', holder)[0] == 200
    state = v4_state(7, [v4_resource('n', {0: {'id': '0'}, 1: {'id': '1'}}),
                         v4_resource('x', {None: {'id': 'x'}}, module='module.net', mode='data')])
    assert write(server, 'app', state, lock_id='L-1')[0] == 200
    big = v4_state(1, [v4_resource('b', {None: {'blob': 'x' * 3000}})])
    assert write(server, 'big', big)[0] == 200

    status, headers, text = get_page(server, '/ui')
    assert status == 200 and headers['Content-Type'] == HTML
    assert_dashboard_headers(headers)
    assert SCRIPT not in text and '&lt;script&gt;alert(1)&lt;/script&gt;' in text
    assert not re.search(r'<script|<link|<img|src=|url\(|https?:', text)   # nothing from elsewhere
    rows = overview(text)
    assert sorted(rows) == ['app', 'big']       # not the health check's environment
    assert rows['app'] == [SCRIPT, 'OperationTypeApply', 'L-1', '3 min ago', '7', 'lineage-v4',
                           '%d B' % len(state), rows['app'][7], '3']
    assert re.fullmatch(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ', rows['app'][7])
    assert rows['big'][:4] == ['\u2014'] * 4
    assert rows['big'][6] == '%.1f KB' % (len(big) / 1024) and rows['big'][8] == '1'


def test_the_environment_page_shows_every_lock_field_and_the_history(tyl_factory):
    server = tyl_factory().start()
    holder = json.dumps({'ID': 'L-<2>', 'Operation': 'OperationTypePlan', 'Info': 'a & b',
                         'Who': SCRIPT, 'Version': '1.0.3', 'Path': '', 'Created': 'yesterday',
                         'Extra"field': '<i>'}).encode()
    for serial in (1, 2):
        assert write(server, 'app', v4_state(serial, []))[0] == 200
    assert lock(server, 'app', holder)[0] == 200

    status, headers, text = get_page(server, '/ui/env?env=app')
    assert status == 200 and headers['Content-Type'] == HTML
    assert_dashboard_headers(headers)
    assert SCRIPT not in text and '<i>' not in text
    fields = dict(re.findall(r'<tr><td>([^<]*)</td><td>([^<]*)</td></tr>', text))
    assert fields['ID'] == 'L-&lt;2&gt;' and fields['Info'] == 'a &amp; b'
    assert fields['Who'] == '&lt;script&gt;alert(1)&lt;/script&gt;'
    assert fields['Extra&quot;field'] == '&lt;i&gt;'
    assert fields['Created'] == 'yesterday' and fields['Locked'] == '?'
    versions = history(server, 'app')
    for version in versions:
        row = '<tr><td>%s</td><td>%d</td><td>%s</td>' % (version['version'], version['serial'],
                                                         version['created'])
        assert row in text and version['sha256'][:12] in text
    assert form_token(text)         # no authentication: anyone is admin


def test_lock_age_reads_rfc3339_with_nine_digits_and_offsets():
    def created(seconds_ago, suffix='.123456789Z', shift=0):
        return time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(time.time() - seconds_ago + shift)) \
            + suffix

    assert tylserver._age(created(185)) == '3 min ago'
    assert tylserver._age(created(185, 'Z')) == '3 min ago'
    assert tylserver._age(created(185, '.5+02:00', 7200)) == '3 min ago'
    assert tylserver._age(created(185, '-05:30', -19800)) == '3 min ago'
    assert tylserver._age(created(5 * 3600)) == '5 h ago'
    assert tylserver._age(created(3 * 86400)) == '3 days ago'
    assert tylserver._age(created(-60)) == '0 s ago'
    assert tylserver._age('2021-07-29T12:34:56.123456789Z').endswith(' days ago')
    for bad in ('yesterday', '', None, 42, '2021-13-01T00:00:00Z', '2021-07-29T12:34:56',
                '2021-07-29T12:34:60Z', '2021-07-29T12:34:56.Z'):
        assert tylserver._age(bad) == '?', bad


def test_resource_counts_are_parsed_again_only_when_size_serial_or_lineage_change():
    dashboard = tylserver.Dashboard()
    one = v4_state(5, [v4_resource('a', {None: {}})])
    two = v4_state(5, [v4_resource('b', {0: {}, 1: {}})])
    one += b' ' * (len(two) - len(one))
    assert len(one) == len(two)

    def count(name, state):
        return dashboard.resource_count(name, state, tylserver.inspect_state(state))

    assert count('app', one) == 1
    assert count('app', two) == 1       # same size, serial and lineage: not parsed again
    assert count('other', two) == 2
    assert count('app', two.replace(b'"serial": 5', b'"serial": 6')) == 2


def diff_page(server, env, old=None, new=None):
    query = {'env': env}
    query.update({key: value for key, value in (('from', old), ('to', new)) if value})
    status, _, text = get_page(server, '/ui/env?' + urlencode(query))
    assert status == 200, text
    return {kind: listed(text, kind) for kind in ('added', 'removed', 'changed')}


def test_diff_of_version_4_states(tyl_factory):
    server = tyl_factory().start()
    old = v4_state(1, [v4_resource('n', {0: {'id': '0'}, 1: {'id': '1'}}),
                       v4_resource('m', {'a': {'id': 'a'}}),
                       v4_resource('x', {None: {'result': {}}}, module='module.net', mode='data')])
    new = v4_state(2, [v4_resource('n', {0: {'id': '0'}, 1: {'id': 'one'}, 2: {'id': '2'}}),
                       v4_resource('m', {'a': {'id': 'a'}, 'b': {'id': 'b'}}),
                       v4_resource('n', {None: {'id': '<b>'}}, module='module.net["<b>"]')])
    for state in (old, new, new.replace(b'"serial": 2', b'"serial": 3')):
        assert write(server, 'app', state)[0] == 200
    first, second, third = [v['version'] for v in reversed(history(server, 'app'))]

    assert diff_page(server, 'app', first, second) == {
        'added': ['module.net["<b>"].null_resource.n', 'null_resource.m["b"]', 'null_resource.n[2]'],
        'removed': ['module.net.data.null_resource.x'],
        'changed': ['null_resource.n[1]']}
    assert diff_page(server, 'app', second, first) == {
        'added': ['module.net.data.null_resource.x'],
        'removed': ['module.net["<b>"].null_resource.n', 'null_resource.m["b"]', 'null_resource.n[2]'],
        'changed': ['null_resource.n[1]']}
    # By default, the two newest versions: only the serial differs.
    assert diff_page(server, 'app') == {'added': [], 'removed': [], 'changed': []}
    assert diff_page(server, 'app', new=third) == {'added': [], 'removed': [], 'changed': []}
    _, _, text = get_page(server, '/ui/env?env=app&from=%s&to=%s' % (first, second))
    assert '<option value="%s" selected>' % first in text
    assert 'module.net[&quot;&lt;b&gt;&quot;].null_resource.n' in text and '<b>' not in text


def test_diff_of_version_3_states(tyl_factory):
    server = tyl_factory().start()
    old = v3_state(1, {('root',): {'null_resource.a': {'id': '1'}, 'null_resource.b.0': {'id': '2'}},
                       ('root', 'child'): {'null_resource.c': {'id': '3'}}})
    new = v3_state(2, {('root',): {'null_resource.a': {'id': '1', 'triggers.%': '1'}},
                       ('root', 'child'): {'null_resource.c': {'id': '3'},
                                           'null_resource.d': {'id': '4'}}})
    for state in (old, new):
        assert write(server, 'legacy', state)[0] == 200
    assert diff_page(server, 'legacy') == {'added': ['module.child.null_resource.d'],
                                           'removed': ['null_resource.b.0'],
                                           'changed': ['null_resource.a']}
    assert overview(get_page(server, '/ui')[2])['legacy'][8] == '3'


def test_a_comparison_needs_two_versions_and_known_ones(tyl_factory):
    server = tyl_factory().start()
    assert write(server, 'app', v4_state(1, []))[0] == 200
    status, _, text = get_page(server, '/ui/env?env=app')
    assert status == 200 and 'A comparison needs two versions.' in text
    assert write(server, 'app', v4_state(2, []))[0] == 200
    status, _, text = get_page(server, '/ui/env?env=app&from=999')
    assert (status, text) == (404, 'env app has no version 999\n')
    assert get_page(server, '/ui/env')[:1] == (400,)
    assert get_page(server, '/ui/env?env=..%2Fx')[:1] == (400,)
    assert server.request('POST', '/ui')[0] == 405


HALF_BROKEN_BACKEND = '''
import tylstore

STATES = {'fine': '{"version": 4, "serial": 7, "lineage": "ok", "resources": []}'}


class HalfBroken(tylstore.TYLPersistent):
    """Env "broken" cannot read its state; "fine" has one, though nothing
    was written through this server process."""

    def __init__(self, environment, constants, **kwargs):
        self.environment = environment

    def set_locked(self, state_obj, **kwargs):
        return True

    def set_unlocked(self, state_obj, **kwargs):
        return True

    def get_lock_state(self):
        return ''

    def store_tfstate(self, tfstate_obj, **kwargs):
        STATES[self.environment] = kwargs['raw']

    def get_tfstate(self):
        if self.environment == 'broken':
            raise OSError('disk <b>on fire</b>')
        return STATES.get(self.environment, '')

    @classmethod
    def list_environments(cls, constants):
        return sorted(set(STATES) | {'broken', 'fine'})
'''


def test_the_page_says_when_history_is_off(tyl_factory):
    server = tyl_factory(HISTORY_KEEP=0).start()
    assert write(server, 'app', v4_state(1, []))[0] == 200
    status, _, text = get_page(server, '/ui/env?env=app')
    assert status == 200 and 'History is off: <code>HISTORY_KEEP: 0</code>.' in text
    assert 'No version kept yet.' not in text


def test_a_backend_error_shows_in_its_row_only(tyl_factory, tmp_path):
    plugins = write_plugin(tmp_path / 'plugins', 'half_broken', HALF_BROKEN_BACKEND)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, BACKEND_CLASS='half_broken.HalfBroken').start()
    assert write(server, 'touched', v4_state(1, []))[0] == 200
    assert get_page(server, '/?env=only-read')[0] == 204
    status, _, text = get_page(server, '/ui')
    assert status == 200
    assert 'OSError: disk &lt;b&gt;on fire&lt;/b&gt;' in text and '<b>' not in text
    rows = overview(text)
    assert rows['broken'] == ['OSError: disk <b>on fire</b>']
    assert rows['fine'][4:6] == ['7', 'ok'] and rows['touched'][4] == '1'
    assert 'only-read' not in rows
    assert 'dashboard: env broken: OSError: disk <b>on fire</b>' in server.log()
    assert 'Traceback' not in server.log()
    status, _, text = get_page(server, '/ui/env?env=fine')
    assert status == 200 and 'HalfBroken keeps no history.' in text


# Valid JSON objects, so stored as states, that Terraform would not have written.
ODD_STATES = [
    {'resources': {'a': 1}}, {'resources': [1, 'x', None]},
    {'resources': [{'type': 't', 'name': 'n', 'instances': {'a': 1}}]},
    {'resources': [{'type': 't', 'name': 'n', 'instances': [1, None, 'x']}]},
    {'version': 3, 'modules': {'a': 1}}, {'version': 3, 'modules': [1, {'path': 5, 'resources': [1]}]},
    {'version': 3, 'modules': [{'path': ['root'], 'resources': {'a': {'primary': 's'}, 'b': 7}}]},
]


def test_odd_states_render_both_pages_and_compare(tyl_factory):
    server = tyl_factory().start()
    good = v4_state(2, [v4_resource('n', {None: {'id': '1'}})])
    for number, odd in enumerate(ODD_STATES):
        env = 'odd-%d' % number
        odd = json.dumps(dict({'serial': 1, 'lineage': 'l'}, **odd)).encode()
        for state in (odd, good, odd):
            assert write(server, env, state)[0] == 200
        assert diff_page(server, env)['removed'] == ['null_resource.n'], odd
        first, second = [v['version'] for v in reversed(history(server, env))][:2]
        assert diff_page(server, env, first, second)['added'] == ['null_resource.n'], odd
    status, _, text = get_page(server, '/ui')
    assert status == 200 and 'class="error"' not in text
    assert [row[8] for _, row in sorted(overview(text).items())] == ['0'] * 6 + ['2']


def test_a_lock_created_at_either_end_of_the_calendar_has_an_unknown_age(tyl_factory):
    server = tyl_factory().start()
    for env, created in (('first', '0001-01-01T00:00:00+01:00'), ('last', '9999-12-31T23:59:59-01:00')):
        assert lock(server, env, json.dumps({'ID': 'L', 'Who': 'w', 'Created': created}).encode())[0] == 200
        status, _, text = get_page(server, '/ui/env?env=' + env)
        assert status == 200, text
        assert dict(re.findall(r'<tr><td>([^<]*)</td><td>([^<]*)</td></tr>', text))['Locked'] == '?'
        assert form_token(text)     # the lock can still be released from here
    rows = overview(get_page(server, '/ui')[2])
    assert rows == {'first': ['w', '?', 'L', '?'] + ['\u2014'] * 5,
                    'last': ['w', '?', 'L', '?'] + ['\u2014'] * 5}


def test_a_state_edited_by_hand_shows_its_fault_in_its_row(tyl_factory):
    server = tyl_factory().start()
    resources = [v4_resource(name, {None: {'id': name}}) for name in 'ab']
    for env in ('app', 'db'):
        assert write(server, env, v4_state(1, resources[:1]))[0] == 200
        assert write(server, env, v4_state(2, resources))[0] == 200
    replace_state_file(server, b'[1, 2]')
    status, _, text = get_page(server, '/ui')
    assert status == 200, text
    rows = overview(text)
    assert rows['app'] == ['StoredDataError: stored state must be a JSON object, not list']
    assert rows['db'][4:6] == ['2', 'lineage-v4']
    status, _, text = get_page(server, '/ui/env?env=app')
    assert status == 200, text
    assert 'stored state must be a JSON object' in text
    assert listed(text, 'added') == ['null_resource.b']   # the versions are intact


ODD_HISTORY_BACKEND = '''
from half_broken import HalfBroken

STATE = b'{"version": 4, "serial": 2, "lineage": "l", "resources": []}'


class OddHistory(HalfBroken):
    """A history whose metadata is not of the types TYL writes, as a git
    commit's trailer written by hand could give."""

    def list_versions(self):
        return [{'version': '2', 'serial': {'a': 1}, 'size': '<big>', 'sha256': 1234567890123456789,
                 'created': ['<now>']},
                {'version': '1', 'serial': 1, 'size': True, 'sha256': ['x'], 'created': None}]

    def get_version(self, version):
        return STATE if version in ('1', '2') else None
'''


def test_history_metadata_of_any_type_shows_as_it_is(tyl_factory, tmp_path):
    write_plugin(tmp_path / 'plugins', 'half_broken', HALF_BROKEN_BACKEND)
    plugins = write_plugin(tmp_path / 'plugins', 'odd_history', ODD_HISTORY_BACKEND)
    server = tyl_factory(BACKEND_PLUGINS_PATH=plugins, BACKEND_CLASS='odd_history.OddHistory').start()
    status, _, text = get_page(server, '/ui/env?env=app')
    assert status == 200, text
    rows = re.findall(r'<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>[^<]*</td>'
                      r'<td>[^<]*</td><td>([^<]*)</td><td>([^<]*)</td></tr>', text)
    assert [tuple(html.unescape(cell) for cell in row) for row in rows] == [
        ('2', "{'a': 1}", "['<now>']", '<big>', '123456789012'),
        ('1', '1', '\u2014', 'True', "['x']")]
    assert '<big>' not in text and '<now>' not in text


def test_history_metadata_of_any_type_is_listed_by_the_cli_as_it_is(tyl_factory, tmp_path):
    write_plugin(tmp_path / 'plugins', 'half_broken', HALF_BROKEN_BACKEND)
    plugins = write_plugin(tmp_path / 'plugins', 'odd_history', ODD_HISTORY_BACKEND)
    server = configured(tyl_factory, BACKEND_PLUGINS_PATH=plugins,
                        BACKEND_CLASS='odd_history.OddHistory')
    done = run(server, 'history', 'app')
    assert done.returncode == 0, done.stderr
    rows = [re.split(r'  +', line) for line in done.stdout.decode('utf-8').splitlines()[1:]]
    assert [row[:5] for row in rows] == [['2', "{'a': 1}", "['<now>']", '<big>', '123456789012'],
                                         ['1', '1', '-', 'True', "['x']"]]


# --------------------------------------------------------------------------
# who may see and do what; the force-unlock form
# --------------------------------------------------------------------------

@pytest.fixture
def audited(tyl_factory, hashes):
    """test_security's users and rules, with AUDIT_LOG; plain requests are root's.
    prod-app is locked by ci; dev has a state."""
    server = tyl_factory(**auth_config(hashes, **AUDIT)).start()
    server.default_headers = credentials('root')
    assert lock(server, 'prod-app', lock_info('L-ci', who='ci@runner'))[0] == 200
    assert write(server, 'dev', v4_state(1, []))[0] == 200
    return server


def test_pages_need_credentials_and_show_only_readable_environments(audited):
    for path in ('/ui', '/ui/env?env=dev'):
        status, headers, body = as_user(audited, None, 'GET', path)
        assert status == 401 and headers['WWW-Authenticate'].startswith('Basic realm="TYL"')
        assert body == b'authentication required\n'
    assert post_force_unlock(audited, None, 'prod-app', {'csrf_token': 'x'})[0] == 401
    assert get_page(audited, '/ui', 'dave')[:1] == (403,)
    assert get_page(audited, '/ui/env?env=dev', 'dave')[:1] == (403,)
    for user in ('root', 'alice', 'bob', 'ci'):
        status, _, text = get_page(audited, '/ui', user)
        assert status == 200 and sorted(overview(text)) == ['dev', 'prod-app'], user
    status, _, text = get_page(audited, '/ui', '\u00e9mile')
    assert status == 200 and sorted(overview(text)) == ['dev']
    assert 'prod-app' not in text
    status, _, text = get_page(audited, '/ui/env?env=prod-app', '\u00e9mile')
    assert (status, text) == (403, 'user \\u00e9mile has no read access to env prod-app\n')


def test_force_unlock_needs_admin_the_users_token_and_this_origin(audited):
    assert lock(audited, 'prod-db', lock_info('L-db'))[0] == 200
    _, _, page = get_page(audited, '/ui/env?env=prod-app', 'alice')
    token = form_token(page)
    assert token and 'Force-unlock</button>' in page
    _, _, root_page = get_page(audited, '/ui/env?env=prod-app', 'root')
    _, _, other_env_page = get_page(audited, '/ui/env?env=prod-db', 'alice')
    for user in ('ci', 'bob'):      # a writer and a reader see no form, and cannot post one
        status, _, text = get_page(audited, '/ui/env?env=prod-app', user)
        assert status == 200 and 'ci@runner' in text
        assert form_token(text) is None and 'Force-unlock' not in text
        assert post_force_unlock(audited, user, 'prod-app', {'csrf_token': token})[0] == 403
    origin = 'http://127.0.0.1:%d' % audited.port
    refused = [
        ({}, {}, 'missing or wrong csrf_token'),
        ({'csrf_token': ''}, {}, 'missing or wrong csrf_token'),
        ({'csrf_token': token[:-1] + ('0' if token[-1] != '0' else '1')}, {}, 'csrf_token'),
        ({'csrf_token': form_token(root_page)}, {}, 'csrf_token'),          # another user's
        ({'csrf_token': form_token(other_env_page)}, {}, 'csrf_token'),     # another env's
        ({'csrf_token': token}, {'Origin': 'http://evil.example'}, 'another origin'),
        ({'csrf_token': token}, {'Origin': 'null', 'Sec-Fetch-Site': 'cross-site'}, 'another site'),
        ({'csrf_token': token}, {'Origin': origin + '.evil.example'}, 'another origin'),
        ({'csrf_token': token}, {'Sec-Fetch-Site': 'cross-site'}, 'another site'),
    ]
    for fields, headers, reason in refused:
        status, _, body = post_force_unlock(audited, 'alice', 'prod-app', fields, headers)
        assert status == 403 and reason in body.decode(), (fields, headers, body)
        assert body.count(b'\n') == 1
        assert b'"ID":"L-ci"' in holder_of(audited, 'prod-app')
    # A browser sends Origin: null from a page with Referrer-Policy: no-referrer.
    for accepted in ({'Origin': 'null', 'Sec-Fetch-Site': 'same-origin'}, {'Origin': origin}):
        status, headers, body = post_force_unlock(audited, 'alice', 'prod-app',
                                                  {'csrf_token': token}, accepted)
        assert (status, headers['Location'], body) == (303, '/ui/env?env=prod-app', b'')
        assert_dashboard_headers(headers)
        assert holder_of(audited, 'prod-app') is None
        _, _, text = get_page(audited, '/ui/env?env=prod-app', 'alice')
        assert 'Not locked.' in text and form_token(text) is None
        assert lock(audited, 'prod-app', lock_info('L-again'))[0] == 200

    lines = [(line['user'], line['env'], line['action'], line['lock_id'], line['status'])
             for line in audit_lines(audited) if line['action'] == 'force-unlock']
    assert lines == [('ci', 'prod-app', 'force-unlock', None, 403),
                     ('bob', 'prod-app', 'force-unlock', None, 403)] \
        + [('alice', 'prod-app', 'force-unlock', None, 403)] * len(refused) \
        + [('alice', 'prod-app', 'force-unlock', 'L-ci', 303),
           ('alice', 'prod-app', 'force-unlock', 'L-again', 303)]
    _, samples = scrape(audited)
    assert value(samples, 'tyl_force_unlocks_total') == 2
    assert value(samples, 'tyl_locks_held') == 2       # prod-db, and prod-app again


def test_force_unlock_false_shows_no_form_and_changes_nothing(tyl_factory):
    server = tyl_factory(FORCE_UNLOCK=False).start()
    assert lock(server, 'app', lock_info('L-1'))[0] == 200
    _, _, text = get_page(server, '/ui/env?env=app')
    assert form_token(text) is None and 'Force-unlock' not in text
    assert post_force_unlock(server, None, 'app', {'csrf_token': '0' * 64})[0] == 403
    assert b'"ID":"L-1"' in holder_of(server, 'app')


# --------------------------------------------------------------------------
# a real browser
# --------------------------------------------------------------------------

# Seconds for one WebDriver command, and for chromedriver to start.
COMMAND_TIMEOUT = 60
START_TIMEOUT = 30
CHROMIUM_ARGUMENTS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                      '--no-first-run', '--disable-background-networking',
                      '--disable-component-update', '--disable-sync']


def require_browser():
    """Skip when Debian's chromium or chromium-driver is missing, unless
    TYL_REQUIRE_BROWSER=1: then FAIL, as test_terraform.require does for
    Terraform under TYL_REQUIRE_TERRAFORM=1."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if not missing:
        return
    reason = '%s missing (apt-get install chromium chromium-driver)' % ' and '.join(missing)
    if os.environ.get('TYL_REQUIRE_BROWSER') == '1':
        pytest.fail('TYL_REQUIRE_BROWSER=1 but ' + reason, pytrace=False)
    pytest.skip(reason)


def wait_until(predicate, what, timeout=COMMAND_TIMEOUT, step=0.1):
    """Poll `predicate` at most timeout/step times and for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / step)):
        if predicate():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    pytest.fail('timed out after %ss waiting for %s' % (timeout, what))


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


class WebDriverError(Exception):
    """A WebDriver command answered with an error."""


class WebDriver(object):
    """A W3C WebDriver session on a chromedriver at 127.0.0.1:`port`,
    spoken with http.client and json."""

    ELEMENT = 'element-6066-11e4-a52e-4f735466cecf'

    def __init__(self, port):
        self.port = port
        self.session = None

    def ready(self):
        try:
            return bool(self.call('GET', '/status').get('ready'))
        except (OSError, ValueError, WebDriverError):
            return False

    def start_session(self, user_data_dir):
        options = {'binary': CHROMIUM, 'args': CHROMIUM_ARGUMENTS + ['--user-data-dir=' + user_data_dir]}
        capabilities = {'browserName': 'chrome', 'goog:chromeOptions': options,
                        'timeouts': {'pageLoad': COMMAND_TIMEOUT * 1000, 'script': 10000}}
        answer = self.call('POST', '/session', {'capabilities': {'alwaysMatch': capabilities}})
        self.session = answer['sessionId']

    def call(self, method, path, payload=None):
        """One WebDriver request; its `value`, or WebDriverError."""
        connection = http.client.HTTPConnection('127.0.0.1', self.port, timeout=COMMAND_TIMEOUT)
        try:
            body = None if payload is None else json.dumps(payload).encode('utf-8')
            connection.request(method, path, body=body, headers={'Content-Type': 'application/json'})
            response = connection.getresponse()
            answer = json.loads(response.read().decode('utf-8') or '{}')
        finally:
            connection.close()
        if response.status != 200:
            raise WebDriverError('%s %s: %d %s' % (method, path, response.status, answer.get('value')))
        return answer.get('value')

    def command(self, method, path, payload=None):
        return self.call(method, '/session/%s%s' % (self.session, path), payload)

    def navigate(self, url):
        self.command('POST', '/url', {'url': url})

    def url(self):
        return self.command('GET', '/url')

    def source(self):
        return self.command('GET', '/source')

    def find(self, css):
        return self.command('POST', '/element', {'using': 'css selector', 'value': css})[self.ELEMENT]

    def text(self, css='body'):
        return self.command('GET', '/element/%s/text' % self.find(css))

    def click(self, css):
        self.command('POST', '/element/%s/click' % self.find(css), {})

    def execute(self, script, *args):
        return self.command('POST', '/execute/sync', {'script': script, 'args': list(args)})

    def texts(self, css):
        """The text of every element `css` selects."""
        return self.execute('return Array.from(document.querySelectorAll(arguments[0]), '
                            'element => element.textContent)', css)

    def quit(self):
        if self.session is not None:
            self.command('DELETE', '')


@pytest.fixture
def browser(tmp_path):
    """browser() starts chromedriver on 127.0.0.1 and a headless Chromium
    session, and returns its WebDriver; both end with the test.  The check
    for the binaries runs in the test's body, so that a missing one under
    TYL_REQUIRE_BROWSER=1 fails the test rather than its setup."""
    started = []

    def start():
        require_browser()
        port, log_path = free_port(), tmp_path / 'chromedriver.log'
        with open(str(log_path), 'wb') as log:
            process = subprocess.Popen([CHROMEDRIVER, '--port=%d' % port], stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        started.append(process)
        driver = WebDriver(port)
        wait_until(lambda: process.poll() is not None or driver.ready(), 'chromedriver', START_TIMEOUT)
        assert process.poll() is None, log_path.read_text(errors='replace')
        profile = tmp_path / 'chromium-profile'
        profile.mkdir()
        driver.start_session(str(profile))
        started.append(driver)
        return driver

    yield start
    if len(started) > 1:
        try:
            started[1].quit()
        except (OSError, WebDriverError):
            pass
    if started:
        stop_process_group(started[0])


def stop_process_group(process):
    """SIGTERM, then SIGKILL, the session of a process this test started."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sent)
        except ProcessLookupError:
            return
        try:
            process.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


def signed_in(server, user):
    """The dashboard's URL with `user`'s credentials, which Chromium then
    keeps for the origin and sends with every request, form posts too."""
    return 'http://%s:%s@127.0.0.1:%d/ui' % (user, PASSWORDS[user], server.port)


def page_shows(driver, text):
    """A predicate for wait_until: the page shows `text`.  While the page
    is being replaced, the element read may go stale: not yet, then."""
    def shows():
        try:
            return text in driver.text()
        except WebDriverError:
            return False
    return shows


def test_browser_shows_the_lock_and_force_unlocks_only_with_the_token(secured, browser):
    server, env = secured, 'prod-app'
    assert lock(server, env, lock_info('L-held', who='ci@runner-7'))[0] == 200
    driver = browser()

    driver.navigate(signed_in(server, 'alice'))
    wait_until(page_shows(driver, 'Environments'), 'the dashboard')
    row = driver.text('tr:nth-child(2)')
    assert env in row and 'ci@runner-7' in row and 'OperationTypeApply' in row and 'L-held' in row

    page = 'http://127.0.0.1:%d/ui/env?env=%s' % (server.port, env)
    for tamper in ("document.querySelector('input[name=csrf_token]').remove()",
                   "document.querySelector('input[name=csrf_token]').value = '0'.repeat(64)"):
        driver.navigate(page)
        wait_until(page_shows(driver, 'Force-unlock'), 'the force-unlock form')
        driver.execute(tamper)
        driver.click('form[method=post] button')
        wait_until(page_shows(driver, 'missing or wrong csrf_token'), 'the 403 page')
        assert b'"ID":"L-held"' in holder_of(server, env)

    driver.navigate(page)
    wait_until(page_shows(driver, 'Force-unlock'), 'the force-unlock form')
    driver.click('form[method=post] button')
    wait_until(page_shows(driver, 'Not locked.'), 'the page after the force-unlock')
    assert driver.url() == page
    assert holder_of(server, env) is None
    posts = [line for line in server.log().splitlines() if '"POST /ui/force-unlock' in line]
    assert len(posts) == 3 and all('user=alice' in line for line in posts), posts
    assert ['status=403' in line for line in posts] == [True, True, False]


def test_browser_diff_shows_what_a_second_terraform_apply_added(secured, browser, tf):
    server, env = secured, 'prod-app'
    work = tf().write(secure_backend(server, env, 'ci') + counted_resources(1))
    work.init()
    work.apply()
    first = history(server, env)[0]['version']
    work.write(secure_backend(server, env, 'ci') + counted_resources(3))
    work.apply()
    second = history(server, env)[0]['version']
    driver = browser()

    driver.navigate(signed_in(server, 'bob'))      # a reader
    wait_until(page_shows(driver, 'Environments'), 'the dashboard')
    driver.click('a[href="/ui/env?env=%s"]' % env)
    wait_until(page_shows(driver, 'Compare'), 'the environment page')
    assert 'Force-unlock' not in driver.text()
    driver.execute("document.querySelector('select[name=from]').value = arguments[0];"
                   "document.querySelector('select[name=to]').value = arguments[1];", first, second)
    driver.click('form[method=get] button')
    wait_until(lambda: 'from=' in driver.url(), 'the comparison')
    assert driver.texts('#added li') == ['null_resource.n[1]', 'null_resource.n[2]']
    assert driver.texts('#removed li') == driver.texts('#changed li') == []
    assert driver.texts('section h3') == ['Added: 2', 'Removed: 0', 'Changed: 0']
    assert driver.text('tr:nth-child(2) td:nth-child(9)') == '3'    # resources now
