"""Real Terraform 1.0.3 over HTTPS, with `username` and `password` in its backend block.

The server runs test_security.py's users and rules with the test CA's
certificate (conftest.py).  Terraform trusts that CA through SSL_CERT_FILE,
or skips verification with `skip_cert_verification`.  Binaries and work
directories come from test_terraform.py.
"""

import json

import pytest

from test_security import PASSWORDS, auth_config, credentials, hashes  # noqa: F401 (fixture)
from test_terraform import (assert_lock_free, backend, flat, lock_body, null_resource,  # noqa: F401
                            raw_lock, stored, tf, tf_env, v4_resources)


@pytest.fixture
def tls_server(tyl_factory, hashes, certificates):  # noqa: F811
    server = tyl_factory(**certificates.server_config(**auth_config(hashes))).start()
    server.client_context = certificates.client_context()
    server.default_headers = credentials('root')
    return server


def secure_backend(server, env, user, password=None, skip_cert_verification=False):
    """test_terraform's backend block, plus credentials and perhaps skip_cert_verification."""
    settings = '    username = "%s"\n    password = "%s"\n' % (
        user, PASSWORDS[user] if password is None else password)
    if skip_cert_verification:
        settings += '    skip_cert_verification = true\n'
    return backend(server, env).replace('  }\n}\n', settings + '  }\n}\n')


def trusting(work, certificates):
    """`work`, with its terraform trusting the test CA."""
    work.env = dict(work.env, SSL_CERT_FILE=certificates.pem('ca'))
    return work


def test_apply_over_https_with_a_password_holding_colons(tls_server, tf, certificates):  # noqa: F811
    env = 'prod-app'
    work = trusting(tf(), certificates).write(secure_backend(tls_server, env, 'ci') + null_resource())
    work.init()
    work.apply()
    _, state = stored(tls_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert_lock_free(tls_server, env)
    assert 'user=ci' in tls_server.log()


def test_apply_with_skip_cert_verification_and_a_non_ascii_user(tls_server, tf):  # noqa: F811
    env = 'dev'
    work = tf().write(secure_backend(tls_server, env, '\u00e9mile', skip_cert_verification=True)
                      + null_resource())
    work.init()
    work.apply()
    _, state = stored(tls_server, env)
    assert v4_resources(state) == [('null_resource', 'a', 1)]
    assert_lock_free(tls_server, env)


def test_a_wrong_password_requires_auth(tls_server, tf, certificates):  # noqa: F811
    env = 'prod-app'
    work = trusting(tf(), certificates).write(
        secure_backend(tls_server, env, 'ci', password='not-the-password') + null_resource())
    _, _, text = work.run('init', '-input=false', '-no-color', '-plugin-dir=%s' % work.plugins,
                          expect=1)
    assert 'HTTP remote state endpoint requires auth' in flat(text), text
    assert stored(tls_server, env) == (None, None)
    assert 'login failed for user "ci"' in tls_server.log()
    assert 'not-the-password' not in tls_server.log()


def test_a_reader_cannot_apply_invalid_auth(tls_server, tf, certificates):  # noqa: F811
    env = 'prod-app'
    work = trusting(tf(), certificates).write(secure_backend(tls_server, env, 'bob') + null_resource())
    work.init()
    _, _, text = work.apply(expect=1)
    assert 'HTTP remote state endpoint invalid auth' in flat(text), text
    assert stored(tls_server, env) == (None, None)
    assert_lock_free(tls_server, env)


def test_force_unlock_needs_admin(tls_server, tf, certificates):  # noqa: F811
    env = 'prod-app'
    holder, body = lock_body(who='crashed@elsewhere')
    assert raw_lock(tls_server, env, body)[0] == 200
    writer = trusting(tf('writer'), certificates)
    writer.write(secure_backend(tls_server, env, 'ci') + null_resource())
    writer.init()
    _, _, text = writer.run('force-unlock', '-force', '-no-color', holder, expect=1)
    assert 'Unexpected HTTP response code 403' in text, text
    status, answer = raw_lock(tls_server, env, lock_body()[1])
    assert status == 423 and json.loads(answer.decode())['ID'] == holder

    admin = trusting(tf('admin'), certificates)
    admin.write(secure_backend(tls_server, env, 'alice') + null_resource())
    admin.init()
    _, _, text = admin.run('force-unlock', '-force', '-no-color', holder)
    assert 'successfully unlocked' in text.lower(), text
    writer.apply()
    assert_lock_free(tls_server, env)


def test_an_untrusted_server_certificate_is_refused(tls_server, tf):  # noqa: F811
    work = tf().write(secure_backend(tls_server, 'dev', 'alice') + null_resource())
    _, _, text = work.run('init', '-input=false', '-no-color', '-plugin-dir=%s' % work.plugins, expect=1)
    assert 'x509' in text and 'unknown authority' in flat(text), text
    assert 'user=alice' not in tls_server.log()


def test_a_wrong_password_on_lock_requires_auth(tls_server, tf, certificates):  # noqa: F811
    """The LOCK's body is left unread and the connection closed after the 401:
    Terraform still reads the 401, not a broken connection."""
    env = 'prod-app'
    work = trusting(tf(), certificates).write(
        backend(tls_server, env).replace('  }\n}\n', '    username = "ci"\n  }\n}\n') + null_resource())
    work.env['TF_HTTP_PASSWORD'] = PASSWORDS['ci']
    work.init()
    work.env['TF_HTTP_PASSWORD'] = 'not-the-password'
    _, _, text = work.apply(expect=1)
    assert 'Error acquiring the state lock' in text
    assert 'HTTP remote state endpoint requires auth' in flat(text), text
    assert 'LOCK /lock?env=prod-app" env=- status=401' in tls_server.log()
    assert stored(tls_server, env) == (None, None)
