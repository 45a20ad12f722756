// Members: everyone's spend this period, roles, limits and enforcement; inviting by email,
// pending invitations and join requests (owners and admins).

import { api, enc, optional } from '../api.js';
import { h, swap } from '../dom.js';
import { parseAmount, percent, plain, usd } from '../money.js';
import {
  button, card, confirm, empty, field, fieldError, form, meter, modal, money, notice, pageHead,
  plural, radios, roleBadge, submit, table, toast, when,
} from '../ui.js';

const ROLE_OPTIONS = [['member', 'Member'], ['admin', 'Admin']];

/** What the signed-in member may do to `target` (mirrors policies/permissions.py). */
function rights(ctx, target) {
  const actor = ctx.role;
  const self = target.user_id === ctx.me.id;
  const staff = ctx.can.manageMembers;
  return {
    role: staff && target.role !== 'owner' && !self,
    limits: ctx.can.managePolicies && (target.role !== 'owner' || actor === 'owner'),
    remove: target.role !== 'owner' && (self || staff),
    self,
  };
}

function limitCell(ctx, m) {
  const limit = m.monthly_limit_usd;
  const source = m.limit_source === 'member' ? 'individual' : 'team default';
  if (limit === null || limit === undefined) {
    return h('div', {}, h('div', {}, 'No limit'), h('div', { class: 'secondary' }, source));
  }
  return h('div', {}, h('div', {}, usd(limit)), h('div', { class: 'secondary' }, source));
}

function spendCell(m) {
  const limit = m.monthly_limit_usd;
  const spent = m.spend_this_period_usd;
  return h('div', { class: 'spend' },
    money(spent),
    limit === null || limit === undefined ? null : meter(percent(spent, limit), `Spend of ${m.name}'s limit`));
}

function enforcementCell(m) {
  const label = m.enforcement === 'soft' ? 'Soft: warn' : 'Hard: refuse';
  return h('div', {}, h('div', {}, label), h('div', { class: 'secondary' }, m.enforcement_source === 'member' ? 'individual' : 'team default'));
}

function editMember(ctx, m, done) {
  const r = rights(ctx, m);
  const t = ctx.team;
  const defaultLimit = t.default_member_limit_usd === null ? 'no limit' : usd(t.default_member_limit_usd);
  const limitMode = m.limit_source !== 'member' ? 'default' : m.monthly_limit_usd === null ? 'unlimited' : 'custom';
  modal(`Edit ${m.name}`, (close) => {
    const amount = field('monthly_limit_usd', 'Individual monthly limit', {
      value: limitMode === 'custom' ? plain(m.monthly_limit_usd) : '', prefix: '$', inputmode: 'decimal',
      placeholder: '25.00', hint: 'Counts this member’s spend with this team’s keys in the current month.',
    });
    const limitChoice = radios('limit_mode', 'Monthly limit', [
      ['default', `Team default (${defaultLimit})`], ['unlimited', 'No limit'], ['custom', 'Individual limit'],
    ], limitMode);
    const sync = () => { amount.hidden = limitChoice.querySelector('input:checked')?.value !== 'custom'; };
    limitChoice.addEventListener('change', () => { sync(); if (!amount.hidden) amount.querySelector('input').focus(); });
    sync();
    const enforcement = radios('enforcement', 'When the limit is reached', [
      ['default', `Team default (${t.default_enforcement})`], ['hard', 'Hard: refuse requests'], ['soft', 'Soft: serve and warn'],
    ], m.enforcement_source === 'member' ? m.enforcement : 'default');
    return form({ 'aria-label': `Edit ${m.name}` }, [
      r.role ? field('role', 'Role', { options: ROLE_OPTIONS, value: m.role, hint: 'Admins manage members, keys and limits; only the owner manages billing.' }) : null,
      r.limits ? [limitChoice, amount, enforcement] : null,
      h('div', { class: 'dialog-actions' }, button('Cancel', () => close()), submit('Save changes')),
    ], async (v) => {
      const body = {};
      if (r.role && v.role !== m.role) body.role = v.role;
      if (r.limits) {
        if (v.limit_mode === 'default') body.monthly_limit_usd = null;
        else if (v.limit_mode === 'unlimited') body.monthly_limit_usd = 'unlimited';
        else {
          let value;
          try {
            value = parseAmount(v.monthly_limit_usd);
          } catch (err) {
            throw fieldError('monthly_limit_usd', err);
          }
          if (value === null) throw fieldError('monthly_limit_usd', new Error('Enter the monthly limit in dollars.'));
          body.monthly_limit_usd = value;
        }
        body.enforcement = v.enforcement === 'default' ? null : v.enforcement;
      }
      await api.patch(`/api/teams/${enc(ctx.teamId)}/members/${enc(m.user_id)}`, body);
      close();
      toast(`Saved ${m.name}’s settings.`);
      await done();
    });
  });
}

async function removeMember(ctx, m, done) {
  const r = rights(ctx, m);
  const ok = await confirm(
    r.self ? `Leave ${ctx.team.name}?` : `Remove ${m.name}?`,
    r.self
      ? 'Your team keys stop working at once and the team disappears from your dashboard. Your past usage stays in its reports.'
      : `${m.name}’s team keys stop working at once and they lose access to the team. Their past usage stays in the reports.`,
    r.self ? 'Leave team' : 'Remove member', { danger: true });
  if (!ok) return;
  await api.del(`/api/teams/${enc(ctx.teamId)}/members/${enc(m.user_id)}`);
  if (r.self) {
    await ctx.refreshMe();
    toast(`You left ${ctx.team.name}.`);
    ctx.navigate('/');
    return;
  }
  toast(`${m.name} was removed and their team keys revoked.`);
  await done();
}

function membersTable(ctx, list, refresh) {
  const columns = [
    { label: 'Member', cell: (m) => h('div', {}, h('div', { class: 'primary' }, m.name, m.user_id === ctx.me.id ? h('span', { class: 'muted' }, ' (you)') : null), h('div', { class: 'secondary' }, m.email)) },
    { label: 'Role', cell: (m) => roleBadge(m.role) },
    { label: 'Spend this period', cell: (m) => spendCell(m) },
    { label: 'Monthly limit', cell: (m) => limitCell(ctx, m) },
    { label: 'Enforcement', cell: (m) => enforcementCell(m) },
    { label: 'Actions', srOnly: true, actions: true, cell: (m) => {
      const r = rights(ctx, m);
      return [
        r.role || r.limits ? button('Edit', () => editMember(ctx, m, refresh), { size: 'small', ariaLabel: `Edit ${m.name}`, focusKey: `edit-${m.user_id}` }) : null,
        r.remove ? button(r.self ? 'Leave' : 'Remove', () => removeMember(ctx, m, refresh), { size: 'small', kind: 'danger', ariaLabel: r.self ? 'Leave the team' : `Remove ${m.name}`, focusKey: `remove-${m.user_id}` }) : null,
      ];
    } },
  ];
  return table(columns, list, { caption: 'Team members', rowKey: (m) => m.email });
}

function inviteForm(ctx, refresh) {
  return form({ class: 'inline-form', 'aria-label': 'Invite by email' }, [
    field('email', 'Email address', { type: 'email', required: true, placeholder: 'name@example.com', autocomplete: 'email' }),
    field('role', 'Role', { options: ROLE_OPTIONS, value: 'member' }),
    submit('Send invitation'),
  ], async (v, el) => {
    const inv = await api.post(`/api/teams/${enc(ctx.teamId)}/invitations`, { email: v.email, role: v.role });
    el.reset();
    const how = inv.email_status === 'sent' ? 'Invitation emailed to' : 'Invitation created for';
    toast(`${how} ${inv.email}.`);
    await refresh();
  });
}

function emailStatus(inv) {
  switch (inv.email_status) {
    case 'sent': return h('span', { class: 'badge admin' }, 'emailed');
    case 'failed': return h('span', { class: 'badge danger', title: 'The mail server refused or timed out; the operator can resend from the outbox.' }, 'mail failed');
    case 'logged': return h('span', { class: 'badge warn', title: 'No SMTP server is configured: the link is in the gateway log.' }, 'in server log');
    default: return h('span', { class: 'badge' }, inv.email_status || 'queued');
  }
}

function invitationsTable(ctx, list, refresh) {
  return table([
    { label: 'Email', cell: (i) => h('div', {}, h('div', { class: 'primary' }, i.email), h('div', { class: 'secondary' }, `invited by ${i.invited_by?.name || 'someone'}`)) },
    { label: 'Role', cell: (i) => roleBadge(i.role) },
    { label: 'Mail', cell: (i) => emailStatus(i) },
    { label: 'Expires', cell: (i) => when(i.expires_at) },
    { label: 'Actions', srOnly: true, actions: true, cell: (i) => button('Revoke', async () => {
      await api.del(`/api/teams/${enc(ctx.teamId)}/invitations/${enc(i.id)}`);
      toast(`Invitation for ${i.email} revoked.`);
      await refresh();
    }, { size: 'small', kind: 'danger', ariaLabel: `Revoke the invitation for ${i.email}`, focusKey: `revoke-${i.id}` }) },
  ], list, { caption: 'Pending invitations', empty: empty('No pending invitations', 'Invitations you send appear here until they are accepted.') });
}

function joinRequestsTable(ctx, list, refresh) {
  const decide = (r, verb) => async () => {
    await api.post(`/api/teams/${enc(ctx.teamId)}/join-requests/${enc(r.id)}/${verb}`);
    toast(verb === 'approve' ? `${r.name || r.email} joined the team.` : `Request from ${r.email} denied.`);
    await refresh();
  };
  return table([
    { label: 'Person', cell: (r) => h('div', {}, h('div', { class: 'primary' }, r.name || r.email), h('div', { class: 'secondary' }, r.email)) },
    { label: 'Asked', cell: (r) => when(r.created_at) },
    { label: 'Actions', srOnly: true, actions: true, cell: (r) => [
      button('Approve', decide(r, 'approve'), { size: 'small', kind: 'primary', ariaLabel: `Approve ${r.email}`, focusKey: `approve-${r.id}` }),
      button('Deny', decide(r, 'deny'), { size: 'small', kind: 'danger', ariaLabel: `Deny ${r.email}`, focusKey: `deny-${r.id}` }),
    ] },
  ], list, { caption: 'Join requests', empty: empty('No join requests', 'People who open your public invite link and ask to join appear here.') });
}

export async function render(ctx) {
  const base = `/api/teams/${enc(ctx.teamId)}`;
  const staff = ctx.can.manageMembers;
  const load = () => Promise.all([
    api.get(`${base}/members`),
    staff ? optional(`${base}/invitations`, { data: [] }) : { data: [] },
    staff ? optional(`${base}/join-requests`, { data: [] }) : { data: [] },
  ]);
  const slots = { members: h('div'), invitations: h('div'), requests: h('div'), requestCount: h('span') };
  const fill = ([members, invitations, requests]) => {
    const pendingInv = (invitations.data || []).filter((i) => !i.status || i.status === 'pending');
    const pendingReq = (requests.data || []).filter((r) => !r.status || r.status === 'pending');
    swap(slots.members, membersTable(ctx, members.data || [], refresh));
    swap(slots.invitations, invitationsTable(ctx, pendingInv, refresh));
    swap(slots.requests, joinRequestsTable(ctx, pendingReq, refresh));
    slots.requestCount.textContent = pendingReq.length ? ` (${pendingReq.length})` : '';
    slots.total = (members.data || []).length;
  };
  async function refresh() {
    fill(await load());
  }
  fill(await load());
  const defaults = ctx.team.default_member_limit_usd === null
    ? 'Members have no default monthly limit.'
    : `Default monthly limit: ${usd(ctx.team.default_member_limit_usd)} (${ctx.team.default_enforcement}).`;
  return {
    title: 'Members',
    body: [
      pageHead('Members', `${plural(slots.total, 'member')} · ${defaults}`),
      h('div', { class: 'stack' },
        card(null, null, slots.members, { flush: true }),
        staff ? card('Invite people', 'They get an email with a link that works once. They sign in or sign up with that address to join.', inviteForm(ctx, refresh)) : null,
        staff ? card('Pending invitations', null, slots.invitations, { flush: true }) : null,
        staff ? h('div', { id: 'join-requests' }, card(h('span', {}, 'Join requests', slots.requestCount), 'From your public invite link (see Settings).', slots.requests, { flush: true })) : null,
        staff ? null : notice('info', h('p', {}, 'Owners and admins invite people and change limits. Ask one of them if you need a higher limit.'))),
    ],
  };
}
