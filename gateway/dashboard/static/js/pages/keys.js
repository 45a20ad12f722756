// API keys: create (the secret is shown once, with a copy button), list, revoke. The same card
// serves team keys and personal keys.

import { api, enc, qs } from '../api.js';
import { h, swap } from '../dom.js';
import { button, card, confirm, copyable, date, empty, field, form, pageHead, submit, table, toast, when } from '../ui.js';

function secretPanel(key, onDone) {
  const panel = h('div', { class: 'notice success', role: 'region', 'aria-label': 'New API key', tabindex: '-1' },
    h('h3', {}, `Your new key “${key.name}”`),
    h('p', {}, 'Copy it now: this is the only time the secret is shown. Store it in your password manager or as an environment variable.'),
    copyable(key.secret, `Secret of ${key.name}`),
    h('div', { class: 'row' }, button('Done, I saved it', onDone, { size: 'small' })));
  return panel;
}

/** opts.team: a team id (team keys) or null (personal keys); opts.canManageAll: staff. */
export async function keysCard(ctx, opts) {
  const listSlot = h('div');
  const secretSlot = h('div');
  const meId = ctx.me.id;
  const load = async () => {
    const body = await api.get(`/api/keys${qs({ team: opts.team })}`);
    const keys = body.data || [];
    const columns = [
      { label: 'Name', cell: (k) => h('div', { class: 'primary' }, k.name) },
      { label: 'Key', cell: (k) => h('code', {}, `${k.prefix}…`) },
      opts.team ? { label: 'Created by', cell: (k) => (k.user_id === meId ? 'you' : k.user_email || k.user_id) } : null,
      { label: 'Created', cell: (k) => h('span', { title: k.created_at }, date(k.created_at)) },
      { label: 'Last used', cell: (k) => when(k.last_used_at) },
      { label: 'Actions', srOnly: true, actions: true, cell: (k) => (k.user_id === meId || opts.canManageAll
        ? button('Revoke', () => revoke(k), { size: 'small', kind: 'danger', ariaLabel: `Revoke ${k.name}`, focusKey: `revoke-${k.id}` })
        : null) },
    ].filter(Boolean);
    swap(listSlot, table(columns, keys, {
      caption: opts.team ? 'Team API keys' : 'Personal API keys',
      rowKey: (k) => k.prefix,
      empty: empty('No keys yet', 'Create a key above and use it as the API key of any OpenAI SDK or tool.'),
    }));
  };
  const revoke = async (k) => {
    const ok = await confirm(`Revoke ${k.name}?`, 'Requests with this key are refused from now on, on every gateway process. This cannot be undone.', 'Revoke key', { danger: true });
    if (!ok) return;
    await api.del(`/api/keys/${enc(k.id)}`);
    toast(`Key ${k.name} revoked.`);
    await load();
  };
  const createForm = form({ class: 'inline-form', 'aria-label': 'Create an API key' }, [
    field('name', 'Key name', { required: true, placeholder: 'e.g. laptop, CI, search-service', hint: 'A name that tells you later where the key is used.' }),
    submit('Create key'),
  ], async (v, el) => {
    const key = await api.post('/api/keys', opts.team ? { name: v.name, team: opts.team } : { name: v.name });
    el.reset();
    const panel = secretPanel(key, () => {
      swap(secretSlot);
      el.querySelector('input').focus();
    });
    swap(secretSlot, panel);
    panel.querySelector('input').focus();
    panel.querySelector('input').select();
    await load();
  });
  await load();
  const title = opts.team ? (opts.canManageAll ? 'All team keys' : 'Your keys in this team') : 'Personal keys';
  return h('div', { class: 'stack' },
    card('Create a key', opts.team ? 'Requests with it are billed to the team (or to you, if your billing mode is personal).' : 'Requests with it are billed to your personal balance.',
      h('div', { class: 'stack' }, createForm, secretSlot)),
    card(title, opts.team && !opts.canManageAll ? 'Owners and admins see every member’s keys.' : null, listSlot, { flush: true }));
}

export async function render(ctx) {
  const body = await keysCard(ctx, { team: ctx.teamId, canManageAll: ctx.can.manageAllKeys });
  return {
    title: 'API keys',
    body: [
      pageHead('API keys', `Use them as the API key of any OpenAI client, with base URL ${location.origin}/v1.`),
      body,
    ],
  };
}
