"""Tell a Slack channel about locks, unlocks and the hosts in new states.

The successor of PyTerraBackTYL's post-processor of the same name, with its
SLACK_* keys and messages.  Enable it with

    POST_PROCESS_CLASSES: ['slack_notify_post_processor.SlackNotifyPostProcessor']
    SLACK_WEBHOOK_URI: 'https://hooks.slack.com/services/...'

Messages leave through a `tylstore.DeliveryQueue`, so a slow or unreachable
Slack never delays Terraform; one that cannot be delivered counts as an
error of this post-processor in GET /state.  Unlike PyTerraBackTYL, the
lock's fields come from the store (LOCK_INFO), so an unlock after a restart
is still told, and they are escaped, so a `Who` of `<!channel>` cannot
notify a whole channel.
"""

import json
from collections import defaultdict

from tylstore import DeliveryQueue, TYLHelpers, TYLNonpersistent


class SlackNotifyPostProcessor(TYLNonpersistent):
    LOCK_INFO = True

    def __init__(self, environment, constants, **kwargs):
        if not constants.SLACK_WEBHOOK_URI:
            raise ValueError('SLACK_WEBHOOK_URI is not set')
        self.environment = environment
        self.C = constants
        self.queue = DeliveryQueue.shared(type(self).__name__, constants)

    def on_locked(self, state_obj, lock_info, **kwargs):
        if self._told_of(lock_info):
            self._post('*LOCKED* :lock:', _format(self.C.SLACK_NOTIFY_FORMAT, lock_info))

    def on_unlocked(self, state_obj, lock_info, **kwargs):
        """`state_obj` is empty on force-unlock; `lock_info` is the lock released."""
        if self.C.SLACK_NOTIFY_UNLOCK and self._told_of(lock_info):
            heading = '*Unlock* :unlock:' if state_obj else '*Force-unlock* :unlock:'
            self._post(heading, _format(self.C.SLACK_NOTIFY_UNLOCK_FORMAT, lock_info))

    def process_tfstate(self, tfstate_obj, **kwargs):
        if self.C.SLACK_NOTIFY_HOST_LIST:
            hosts = TYLHelpers.get_hostnames_from_tfstate(tfstate_obj, self.C.HELPER_HOSTNAME_QUERY_MAP)
            if hosts:
                self._post('Created Hosts :lock_with_ink_pen:', ', '.join(_escape(h) for h in hosts))

    def post_processor_status(self):
        """The queue is shared by every environment."""
        return {'slack_username': self.C.SLACK_NOTIFY_USERNAME, 'queue': self.queue.status()}

    def _told_of(self, lock_info):
        return lock_info.get('Operation') in self.C.SLACK_NOTIFICATIONS_ON_TF_ACTIONS

    def _post(self, heading, message):
        payload = {'username': self.C.SLACK_NOTIFY_USERNAME,
                   'text': '_Environment %s:_ %s\n%s' % (self.environment, heading, message)}
        if self.C.SLACK_NOTIFY_USER_IMAGE_URI:
            payload['icon_url'] = self.C.SLACK_NOTIFY_USER_IMAGE_URI
        self.queue.post(self, self.C.SLACK_WEBHOOK_URI, json.dumps(payload).encode('utf-8'),
                        {'Content-Type': 'application/json'})


def _escape(value):
    """`value` as literal Slack text: &, < and > are its only markup for
    links and mentions."""
    return str(value).replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')


def _format(template, lock_info):
    """The template filled with the lock's fields, escaped; a missing field is empty."""
    return template.format_map(defaultdict(str, {k: _escape(v) for k, v in lock_info.items()}))
