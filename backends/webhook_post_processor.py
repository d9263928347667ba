"""POST a signed JSON event to WEBHOOK_URL for every lock, unlock and write.

Enable it with

    POST_PROCESS_CLASSES: ['webhook_post_processor.WebhookPostProcessor']
    WEBHOOK_URL: 'https://hooks.example.com/tyl'
    WEBHOOK_SECRET: 'a long random string'

Each event is one JSON object:

    event_id     unique per event, and the same in every retry of it, so a
                 receiver can drop the duplicate of a try that timed out late
    environment  the environment name
    action       lock, unlock, force-unlock or write
    lock_id, who, operation
                 ID, Who and Operation of the lock taken, released or
                 force-released, or held by the writer (null without one)
    serial, lineage
                 of the state written (writes only)
    time         when TYL accepted the change, UTC, as 2026-08-21T10:11:12Z

`X-TYL-Signature: sha256=<hex>` is the HMAC-SHA256 of the exact body with
WEBHOOK_SECRET as key.  A receiver computes it over the bytes it received
and compares with `hmac.compare_digest`; `time` lets it refuse old replays.
Without WEBHOOK_SECRET events are sent unsigned.

Events leave through a `tylstore.DeliveryQueue`: in order, never delaying
Terraform, retried, and counted as errors in GET /state when undeliverable.
"""

import hashlib
import hmac
import json
import time
import uuid

from tylstore import DeliveryQueue, TYLNonpersistent


class WebhookPostProcessor(TYLNonpersistent):
    LOCK_INFO = True

    def __init__(self, environment, constants, **kwargs):
        if not constants.WEBHOOK_URL:
            raise ValueError('WEBHOOK_URL is not set')
        self.environment = environment
        self.url = constants.WEBHOOK_URL
        self.secret = constants.WEBHOOK_SECRET
        self.queue = DeliveryQueue.shared(type(self).__name__, constants)

    def on_locked(self, state_obj, lock_info, **kwargs):
        self._send('lock', lock_info)

    def on_unlocked(self, state_obj, lock_info, **kwargs):
        """`state_obj` is empty on force-unlock; `lock_info` is the lock released."""
        self._send('unlock' if state_obj else 'force-unlock', lock_info)

    def process_tfstate(self, tfstate_obj, lock_info, **kwargs):
        self._send('write', lock_info, serial=tfstate_obj.get('serial'),
                   lineage=tfstate_obj.get('lineage'))

    def post_processor_status(self):
        """The queue is shared by every environment."""
        return {'signed': bool(self.secret), 'queue': self.queue.status()}

    def _send(self, action, lock_info, **fields):
        event = dict(fields, event_id=uuid.uuid4().hex, environment=self.environment,
                     action=action, lock_id=lock_info.get('ID'), who=lock_info.get('Who'),
                     operation=lock_info.get('Operation'),
                     time=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()))
        body = json.dumps(event, sort_keys=True).encode('utf-8')
        headers = {'Content-Type': 'application/json'}
        if self.secret:
            digest = hmac.new(self.secret.encode('utf-8'), body, hashlib.sha256).hexdigest()
            headers['X-TYL-Signature'] = 'sha256=' + digest
        self.queue.post(self, self.url, body, headers)
