// Team settings (owners and admins): name, default member limit and enforcement, model access,
// the spending limit (owner), webhooks, the public invite link, and the owner's danger zone.

import { api, enc, optional } from '../api.js';
import { h, swap } from '../dom.js';
import { parseAmount, plain, usd } from '../money.js';
import {
  button, card, confirm, copyable, date, empty, field, fieldError, form, modal, moneyField,
  notice, pageHead, radios, submit, table, toast, when,
} from '../ui.js';

function amount(name, text) {
  try {
    return parseAmount(text);
  } catch (err) {
    throw fieldError(name, err);
  }
}

function teamPath(ctx, rest = '') {
  return `/api/teams/${enc(ctx.teamId)}${rest}`;
}

async function patchTeam(ctx, body, message) {
  const team = await api.patch(teamPath(ctx), body);
  if (team && team.id) Object.assign(ctx.team, team);
  toast(message);
  return team;
}

function general(ctx) {
  return card('Team name', null, form({ class: 'inline-form', 'aria-label': 'Team name' }, [
    field('name', 'Name', { value: ctx.team.name, required: true, autocomplete: 'organization' }),
    submit('Save name'),
  ], async (v) => {
    await patchTeam(ctx, { name: v.name }, 'Team name saved.');
    await ctx.refreshMe();
    ctx.reload();
  }));
}

function memberDefaults(ctx) {
  const t = ctx.team;
  return card('Member limits', 'Applies to every member without an individual limit (set those on the Members page).',
    form({ 'aria-label': 'Member limits' }, [
      h('div', { class: 'form-grid' },
        moneyField('default_member_limit_usd', 'Default monthly limit per member', plain(t.default_member_limit_usd), {
          hint: 'Leave empty for no limit.',
        })),
      radios('default_enforcement', 'When a member reaches their limit', [
        ['hard', 'Hard: refuse their requests (429 member_limit_reached)'],
        ['soft', 'Soft: keep serving, send a warning header and an alert'],
      ], t.default_enforcement),
      h('div', { class: 'form-actions' }, submit('Save member limits')),
    ], async (v) => {
      await patchTeam(ctx, {
        default_member_limit_usd: amount('default_member_limit_usd', v.default_member_limit_usd),
        default_enforcement: v.default_enforcement,
      }, 'Member limits saved.');
    }));
}

function modelAccess(ctx, models) {
  const blocked = new Set(ctx.team.model_restrictions || []);
  const known = new Set(models.map((m) => m.id));
  const extra = [...blocked].filter((m) => !known.has(m));
  if (!models.length) return card('Model access', null, empty('No models configured', 'The operator adds models in config.yaml.'));
  return card('Model access', 'Unchecked models are blocked for everyone in the team (403 model_not_allowed).',
    form({ 'aria-label': 'Model access' }, [
      h('fieldset', { class: 'field' },
        h('legend', { class: 'sr-only' }, 'Allowed models'),
        h('div', { class: 'choices model-list' }, models.map((m) => h('label', { class: 'choice' },
          h('input', { type: 'checkbox', name: 'allowed', value: m.id, checked: !blocked.has(m.id) }),
          h('span', {}, h('code', {}, m.id), h('span', { class: 'muted small' },
            ` ${usd(m.input_per_mtok_usd, { max: 3 })} / ${usd(m.output_per_mtok_usd, { max: 3 })} per 1M tokens`))))),
        h('p', { class: 'field-error' })),
      extra.length ? h('p', { class: 'hint' }, `Also blocked (not configured): ${extra.join(', ')}`) : null,
      h('div', { class: 'form-actions' }, submit('Save model access')),
    ], async (v) => {
      const allowed = new Set([].concat(v.allowed || []));
      const restrictions = [...models.map((m) => m.id).filter((id) => !allowed.has(id)), ...extra];
      await patchTeam(ctx, { model_restrictions: restrictions }, restrictions.length ? `${restrictions.length} model(s) blocked.` : 'Every model is allowed.');
    }));
}

function spendingLimit(ctx) {
  const t = ctx.team;
  if (!ctx.can.manageBilling) {
    return card('Team spending limit', null, h('p', {},
      t.spending_limit_usd === null ? 'No monthly spending limit. ' : `${usd(t.spending_limit_usd)} per month. `,
      h('span', { class: 'muted' }, 'Only the owner changes it.')));
  }
  return card('Team spending limit', 'The most the whole team may spend in a calendar month (UTC); requests beyond it get 429 team_spending_limit_reached.',
    form({ class: 'inline-form', 'aria-label': 'Team spending limit' }, [
      moneyField('spending_limit_usd', 'Monthly spending limit', plain(t.spending_limit_usd), { hint: 'Leave empty for no limit.' }),
      submit('Save spending limit'),
    ], async (v) => {
      await patchTeam(ctx, { spending_limit_usd: amount('spending_limit_usd', v.spending_limit_usd) }, 'Spending limit saved.');
    }));
}

async function inviteLink(ctx) {
  const slot = h('div', { class: 'stack' });
  const path = teamPath(ctx, '/invite-link');
  const show = (status, url) => {
    const enabled = status && status.enabled !== false;
    swap(slot,
      url ? h('div', { class: 'stack' },
        h('p', {}, 'Share this link. Anyone who opens it can ask to join; you approve or deny each request on the Members page.'),
        copyable(url, 'Public invite link'),
        h('p', { class: 'hint' }, 'Copy it now: for safety the link is shown only once. Creating a new link disables this one.'))
        : h('p', {}, enabled
          ? ['A public link is ', h('strong', {}, 'enabled'), status.created_at ? ` (created ${date(status.created_at)}). ` : '. ', 'Create a new one to see a link to copy; the old one stops working.']
          : 'No public link. People join only by invitation.'),
      h('div', { class: 'row' },
        button(enabled ? 'Create a new link' : 'Enable a public link', async () => {
          const created = await api.post(path);
          toast('Public invite link created.');
          show({ enabled: true, created_at: created.created_at }, created.url);
        }, { kind: enabled ? undefined : 'primary', focusKey: 'link-create' }),
        enabled ? button('Disable link', async () => {
          await api.del(path);
          toast('Public invite link disabled.');
          show({ enabled: false }, null);
        }, { kind: 'danger', focusKey: 'link-disable' }) : null));
  };
  show(await optional(path, { enabled: false }), null);
  return card('Public invite link', 'An optional link for requests to join, for example in your team chat.', slot);
}

async function webhooks(ctx) {
  const slot = h('div');
  const secretSlot = h('div');
  const load = async () => {
    const body = await optional(teamPath(ctx, '/webhooks'), null);
    if (body === null) {
      swap(slot, h('p', { class: 'muted' }, 'Webhooks are not available on this gateway.'));
      return false;
    }
    swap(slot, table([
      { label: 'URL', cell: (w) => h('code', {}, w.url) },
      { label: 'Added', cell: (w) => when(w.created_at) },
      { label: 'Actions', srOnly: true, actions: true, cell: (w) => button('Delete', async () => {
        if (!(await confirm('Delete this webhook?', `Alerts stop going to ${w.url}.`, 'Delete webhook', { danger: true }))) return;
        await api.del(teamPath(ctx, `/webhooks/${enc(w.id)}`));
        toast('Webhook deleted.');
        await load();
      }, { size: 'small', kind: 'danger', ariaLabel: `Delete webhook ${w.url}`, focusKey: `wh-${w.id}` }) },
    ], body.data || [], { caption: 'Webhooks', empty: empty('No webhooks', 'Add a URL to receive alerts as JSON POSTs.') }));
    return true;
  };
  const available = await load();
  const addForm = form({ class: 'inline-form', 'aria-label': 'Add a webhook' }, [
    field('url', 'Webhook URL', { type: 'url', required: true, placeholder: 'https://hooks.example.com/modelbridge' }),
    submit('Add webhook'),
  ], async (v, el) => {
    const created = await api.post(teamPath(ctx, '/webhooks'), { url: v.url });
    el.reset();
    toast('Webhook added.');
    if (created.signing_secret) {
      swap(secretSlot, notice('info', h('p', {}, 'Deliveries are signed with this secret (the same for all of the team’s webhooks):'),
        copyable(created.signing_secret, 'Webhook signing secret')));
    }
    await load();
  });
  return card('Alert webhooks', 'Spending and limit alerts are POSTed to these URLs.',
    h('div', { class: 'stack' }, available ? addForm : null, secretSlot, h('div', { class: 'card flush-inner' }, slot)));
}

async function dangerZone(ctx) {
  const members = await api.get(teamPath(ctx, '/members'));
  const others = (members.data || []).filter((m) => m.user_id !== ctx.me.id);
  const transfer = others.length
    ? form({ class: 'inline-form', 'aria-label': 'Transfer ownership' }, [
      field('user_id', 'New owner', { options: others.map((m) => [m.user_id, `${m.name} (${m.email})`]) }),
      submit('Transfer ownership', 'danger'),
    ], async (v) => {
      const target = others.find((m) => m.user_id === v.user_id);
      if (!(await confirm('Transfer ownership?', `${target.name} becomes the owner of ${ctx.team.name}. You become an admin and can no longer change billing or delete the team.`, 'Transfer', { danger: true }))) return;
      await api.post(teamPath(ctx, '/transfer'), { user_id: v.user_id });
      await ctx.refreshMe();
      toast(`${target.name} now owns ${ctx.team.name}.`);
      ctx.navigate(`/teams/${enc(ctx.teamId)}`);
    })
    : h('p', { class: 'muted' }, 'Invite someone first: ownership moves to an existing member.');
  const del = button('Delete team…', () => deleteTeam(ctx), { kind: 'danger solid' });
  return h('section', { class: 'card danger-zone', 'aria-labelledby': 'danger-title' },
    h('div', { class: 'card-head' }, h('div', {}, h('h2', { id: 'danger-title' }, 'Owner actions'), h('p', {}, 'These cannot be undone from the dashboard.'))),
    h('div', { class: 'card-body stack' },
      h('div', { class: 'stack' }, h('h3', {}, 'Transfer ownership'), transfer),
      h('div', { class: 'stack' }, h('h3', {}, 'Delete the team'),
        h('p', {}, 'All team keys stop working at once. Usage history and the audit trail are kept.'), h('div', {}, del))));
}

function deleteTeam(ctx) {
  modal(`Delete ${ctx.team.name}?`, (close) => form({ 'aria-label': 'Delete the team' }, [
    h('p', {}, 'Every key of the team is revoked now and nobody can use the team any more. Type the team name to confirm.'),
    field('confirm_name', 'Team name', { required: true, autocomplete: 'off' }),
    h('div', { class: 'dialog-actions' }, button('Cancel', () => close()), submit('Delete team', 'danger solid')),
  ], async (v) => {
    if (v.confirm_name.trim() !== ctx.team.name) throw fieldError('confirm_name', new Error('The name does not match.'));
    await api.del(teamPath(ctx));
    close();
    localStorage.removeItem('mb:lastTeam');
    await ctx.refreshMe();
    toast(`${ctx.team.name} was deleted.`);
    ctx.navigate('/');
  }));
}

export async function render(ctx) {
  const [models, link, hooks, danger] = await Promise.all([
    optional('/api/models', { data: [] }),
    inviteLink(ctx),
    webhooks(ctx),
    ctx.can.deleteTeam ? dangerZone(ctx) : null,
  ]);
  return {
    title: 'Settings',
    body: [
      pageHead('Settings', `Policies for everyone in ${ctx.team.name}. Changes apply to the next request.`),
      h('div', { class: 'stack' },
        general(ctx), memberDefaults(ctx), modelAccess(ctx, models.data || []), spendingLimit(ctx),
        link, hooks, danger),
    ],
  };
}
