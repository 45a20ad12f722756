// API keys: create (the secret is shown once, with a copy button), list, change, revoke. The same
// card serves team keys and personal keys. A key's controls (contract section 10): when it
// expires, which models it may use, its monthly limit, and its requests and tokens per minute;
// the list shows each key's spend this month, its current rate usage and its refusals.

import { api, enc, optional, qs } from '../api.js';
import { h, swap, uid } from '../dom.js';
import { parseAmount, percent, plain } from '../money.js';
import {
  button, card, confirm, copyable, date, empty, field, fieldError, form, meter, modal, money,
  pageHead, plural, submit, table, toast, when,
} from '../ui.js';

const num = new Intl.NumberFormat();
const REASONS = {
  rate_limit_exceeded: 'rate limit',
  key_limit_reached: 'key limit',
  member_limit_reached: 'member limit',
  team_spending_limit_reached: 'team limit',
  insufficient_quota: 'balance',
  model_not_allowed: 'model not allowed',
};

function secretPanel(key, onDone) {
  const panel = h('div', { class: 'notice success', role: 'region', 'aria-label': 'New API key', tabindex: '-1' },
    h('h3', {}, `Your new key “${key.name}”`),
    h('p', {}, 'Copy it now: this is the only time the secret is shown. Store it in your password manager or as an environment variable.'),
    copyable(key.secret, `Secret of ${key.name}`),
    h('div', { class: 'row' }, button('Done, I saved it', onDone, { size: 'small' })));
  return panel;
}

// --- the controls' fields -------------------------------------------------------------------------
/** "2026-12-31T23:59:59+00:00" -> the value of a datetime-local input, in the browser's zone. */
function localInput(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

function modelsField(models, chosen) {
  const id = uid('models');
  return h('fieldset', { class: 'field', 'aria-describedby': `${id}-hint` },
    h('legend', {}, 'Models'),
    h('div', { class: 'choices' }, models.map((m) => h('label', { class: 'choice' },
      h('input', { type: 'checkbox', name: 'models', value: m, checked: Boolean(chosen && chosen.includes(m)) }),
      h('code', {}, m)))),
    h('p', { class: 'hint', id: `${id}-hint` }, 'None ticked: every model the team allows.'),
    h('p', { class: 'field-error' }));
}

function controlFields(models, key = {}) {
  return h('div', { class: 'form-grid controls' },
    field('expires_at', 'Expires', { type: 'datetime-local', value: localInput(key.expires_at),
      hint: 'Your local time. Empty: never.' }),
    field('monthly_limit_usd', 'Monthly limit', { value: plain(key.monthly_limit_usd), prefix: '$',
      inputmode: 'decimal', placeholder: 'No limit', hint: 'Hard: refused once this month’s spend would pass it.' }),
    field('rpm', 'Requests per minute', { type: 'number', min: 0, step: 1, value: key.rpm ?? '',
      placeholder: 'No limit', inputmode: 'numeric' }),
    field('tpm', 'Tokens per minute', { type: 'number', min: 0, step: 1, value: key.tpm ?? '',
      placeholder: 'No limit', inputmode: 'numeric', hint: 'Counts prompt + max_tokens until the answer, then the actual tokens.' }),
    models.length ? modelsField(models, key.models) : null);
}

function whole(text) {
  return text === undefined || text === '' ? null : Number(text);
}

/** The controls of a submitted form as the API takes them (null: none). */
function controlValues(v) {
  let limit;
  try {
    limit = parseAmount(v.monthly_limit_usd);
  } catch (err) {
    throw fieldError('monthly_limit_usd', err);
  }
  const picked = [].concat(v.models ?? []);
  return {
    expires_at: v.expires_at ? new Date(v.expires_at).toISOString() : null,
    models: picked.length ? picked : null,
    monthly_limit_usd: limit,
    rpm: whole(v.rpm),
    tpm: whole(v.tpm),
  };
}

// --- cells ----------------------------------------------------------------------------------------
function scopeCell(k) {
  const expired = k.expires_at && new Date(k.expires_at) <= new Date();
  return h('div', {},
    h('div', {}, k.models === null ? 'All models' : k.models.length ? k.models.join(', ') : 'No model'),
    h('div', { class: 'secondary' }, expired
      ? h('span', { class: 'badge danger' }, 'Expired')
      : k.expires_at ? ['Expires ', when(k.expires_at)] : 'Never expires'));
}

function spendCell(k) {
  const limit = k.monthly_limit_usd;
  return h('div', { class: 'spend' },
    money(k.spend_this_period_usd),
    limit === null ? h('span', { class: 'secondary' }, 'No limit')
      : [h('span', { class: 'secondary' }, 'of ', money(limit)),
        meter(percent(k.spend_this_period_usd, limit), `Spend of ${k.name}'s limit`)]);
}

function rateCell(k) {
  const u = k.rate_usage;
  if (!u) return h('span', { class: 'muted' }, 'No rate limit');
  return h('div', { class: 'rate', dataset: { rate: k.id } },
    k.rpm !== null ? h('div', {}, `${num.format(u.requests)} / ${num.format(k.rpm)} requests`) : null,
    k.tpm !== null ? h('div', {}, `${num.format(u.tokens)} / ${num.format(k.tpm)} tokens`) : null,
    h('div', { class: 'secondary' }, 'in the last minute'));
}

export function refusedCell(k) {
  const entries = Object.entries(k.refused_this_period || {});
  if (!entries.length) return h('span', { class: 'muted' }, 'None');
  return h('div', { dataset: { refused: k.id } }, entries.map(([code, n]) =>
    h('div', { title: code }, `${plural(n, 'request')} · 429 ${REASONS[code] || code}`)));
}

// --- the card -------------------------------------------------------------------------------------
/** opts.team: a team id (team keys) or null (personal keys); opts.canManageAll: staff. */
export async function keysCard(ctx, opts) {
  const listSlot = h('div');
  const secretSlot = h('div');
  const meId = ctx.me.id;
  const models = ((await optional('/api/models', { data: [] })).data || []).map((m) => m.id);
  const mayChange = (k) => k.user_id === meId || opts.canManageAll;
  const load = async () => {
    const body = await api.get(`/api/keys${qs({ team: opts.team })}`);
    const keys = body.data || [];
    const columns = [
      { label: 'Name', cell: (k) => h('div', {},
        h('div', { class: 'primary' }, k.name),
        h('code', { class: 'secondary' }, `${k.prefix}…`),
        h('div', { class: 'secondary', title: `Created ${k.created_at}` },
          opts.team ? `by ${k.user_id === meId ? 'you' : k.user_email || k.user_id}, ` : '',
          `${date(k.created_at)} · last used `, when(k.last_used_at))) },
      { label: 'Scope', cell: scopeCell },
      { label: 'Spend this month', cell: spendCell },
      { label: 'Rate now', cell: rateCell },
      { label: 'Refused this month', cell: refusedCell },
      { label: 'Actions', srOnly: true, actions: true, cell: (k) => (mayChange(k)
        ? [button('Edit', () => edit(k), { size: 'small', ariaLabel: `Edit ${k.name}`, focusKey: `edit-${k.id}` }),
          button('Revoke', () => revoke(k), { size: 'small', kind: 'danger', ariaLabel: `Revoke ${k.name}`, focusKey: `revoke-${k.id}` })]
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
  const edit = (k) => {
    modal(`Edit ${k.name}`, (close) => form({ 'aria-label': `Edit ${k.name}` }, [
      field('name', 'Key name', { required: true, value: k.name }),
      controlFields(models, k),
      h('div', { class: 'dialog-actions' }, button('Cancel', () => close()), submit('Save changes')),
    ], async (v) => {
      await api.patch(`/api/keys/${enc(k.id)}`, { name: v.name, ...controlValues(v) });
      close();
      toast(`Key ${k.name} saved: it applies from the next request.`);
      await load();
    }));
  };
  const createForm = form({ 'aria-label': 'Create an API key' }, [
    h('div', { class: 'inline-form' },
      field('name', 'Key name', { required: true, placeholder: 'e.g. laptop, CI, search-service', hint: 'A name that tells you later where the key is used.' }),
      submit('Create key')),
    h('details', { class: 'key-controls' },
      h('summary', {}, 'Expiry, models and limits (optional)'),
      controlFields(models)),
  ], async (v, el) => {
    const controls = Object.fromEntries(Object.entries(controlValues(v)).filter(([, value]) => value !== null));
    const key = await api.post('/api/keys', { name: v.name, ...(opts.team ? { team: opts.team } : {}), ...controls });
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

/** For the usage page: this month's spend, rate usage and refusals of the keys with limits. */
export async function keyLimitsCard(path) {
  const keys = ((await optional(path, { data: [] })).data || []).filter((k) =>
    k.monthly_limit_usd !== null || k.rpm !== null || k.tpm !== null || k.expires_at || k.models
    || Object.keys(k.refused_this_period || {}).length);
  if (!keys.length) return null;
  return card('Keys with limits', 'This month’s spend and refusals, and each key’s rate in the last minute.',
    table([
      { label: 'Key', cell: (k) => h('div', {}, h('div', { class: 'primary' }, k.name), h('code', { class: 'secondary' }, `${k.prefix}…`)) },
      { label: 'Scope', cell: scopeCell },
      { label: 'Spend this month', cell: spendCell },
      { label: 'Rate now', cell: rateCell },
      { label: 'Refused this month', cell: refusedCell },
    ], keys, { caption: 'Keys with limits', rowKey: (k) => k.prefix }), { flush: true, id: 'key-limits' });
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
