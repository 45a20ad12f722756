// The personal page: personal balance and usage, personal keys, and per team whether my team
// keys bill the team or my own balance.

import { api, enc, optional, qs } from '../api.js';
import { h } from '../dom.js';
import { exact, usd } from '../money.js';
import { card, empty, errorMessage, pageHead, roleBadge, stat, table, toast, utcToday } from '../ui.js';
import { keysCard } from './keys.js';

function billingModes(ctx) {
  const teams = ctx.me.teams || [];
  return table([
    { label: 'Team', cell: (t) => h('a', { href: `/teams/${enc(t.id)}` }, t.name) },
    { label: 'Role', cell: (t) => roleBadge(t.role) },
    { label: 'My team keys bill', cell: (t) => {
      const select = h('select', { 'aria-label': `Billing mode in ${t.name}`, dataset: { focusKey: `mode-${t.id}` } },
        h('option', { value: 'team' }, 'The team’s balance'),
        h('option', { value: 'personal' }, 'My personal balance'));
      select.value = t.billing_mode || 'team';
      select.addEventListener('change', async () => {
        const mode = select.value;
        select.disabled = true;
        try {
          await api.patch(`/api/teams/${enc(t.id)}/members/${enc(ctx.me.id)}`, { billing_mode: mode });
          t.billing_mode = mode;
          toast(mode === 'personal' ? `Your keys in ${t.name} now bill your personal balance.` : `Your keys in ${t.name} now bill the team.`);
        } catch (err) {
          select.value = t.billing_mode || 'team';
          toast(errorMessage(err), 'error');
        } finally {
          select.disabled = false;
        }
      });
      return select;
    } },
  ], teams, { caption: 'Billing mode per team', empty: empty('You are in no team yet', null, h('a', { class: 'btn', href: '/teams/new' }, 'Create a team')) });
}

export async function render(ctx) {
  const today = utcToday();
  const from = `${today.slice(0, 8)}01`;
  const [me, report] = await Promise.all([
    ctx.refreshMe(),
    optional(`/api/me/usage${qs({ from, to: today, group_by: 'model' })}`, { data: [], total: null }),
  ]);
  ctx.me = me;
  const total = report.total || {};
  const keys = await keysCard(ctx, { team: null });
  return {
    title: 'Personal',
    body: [
      pageHead(me.name, me.email),
      h('div', { class: 'stack' },
        h('div', { class: 'stats' },
          stat('Personal balance', usd(me.balance_usd), { key: 'personal-balance', title: exact(me.balance_usd), hint: 'Prepaid credits on your own account' }),
          stat('Spent this month', usd(total.charged_usd ?? '0'), { key: 'personal-spend', title: exact(total.charged_usd ?? '0'), hint: `${total.requests || 0} requests billed to you` })),
        card('Billing mode', 'A team’s policies (model access, your limit) apply either way; only who pays changes.', billingModes(ctx), { flush: true }),
        keys),
    ],
  };
}
