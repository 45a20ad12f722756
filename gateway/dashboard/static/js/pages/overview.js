// The team overview, the start page and creating a team.

import { api, enc, optional } from '../api.js';
import { h } from '../dom.js';
import { usd, percent } from '../money.js';
import { card, copyable, field, form, pageHead, plural, stat, submit, toast } from '../ui.js';

const LAST_TEAM = 'mb:lastTeam';

function createTeamForm(ctx, label = 'Create team') {
  return form({ class: 'inline-form', 'aria-label': 'Create a team' }, [
    field('name', 'Team name', { required: true, placeholder: 'e.g. Search team', autocomplete: 'organization' }),
    submit(label),
  ], async (v) => {
    const team = await api.post('/api/teams', { name: v.name });
    await ctx.refreshMe();
    toast(`Team ${team.name} created. You are its owner.`);
    ctx.navigate(`/teams/${enc(team.id)}`);
  });
}

export const home = {
  async render(ctx) {
    const teams = ctx.me.teams || [];
    if (teams.length) {
      const last = localStorage.getItem(LAST_TEAM);
      const team = teams.find((t) => t.id === last) || teams[0];
      ctx.navigate(`/teams/${enc(team.id)}`, { replace: true });
      return null;
    }
    return {
      title: 'Welcome',
      body: [
        pageHead(`Welcome, ${ctx.me.name}`, 'ModelBridge meters every request your team sends to its language models.'),
        h('div', { class: 'stack' },
          card('Create your first team', 'A team shares a balance, spending limits and usage reports. You can invite people once it exists.',
            createTeamForm(ctx)),
          card('Or use it on your own', null, h('p', {},
            'Your personal balance and personal API keys are on your ',
            h('a', { href: '/me' }, 'personal page'), '. If someone invited you to a team, open the link from their email.'))),
      ],
    };
  },
};

export const newTeam = {
  async render(ctx) {
    return {
      title: 'New team',
      body: [
        pageHead('Create a team', 'You become its owner: you manage members, limits and billing.'),
        card(null, null, createTeamForm(ctx)),
      ],
    };
  },
};

function quickStart(ctx, model) {
  const base = `${location.origin}/v1`;
  return card('Connect your tools', 'Any OpenAI SDK or tool works: point it at this gateway with a team key.',
    h('div', { class: 'stack' },
      h('div', { class: 'field' }, h('span', { class: 'fieldset-label' }, 'Base URL'), copyable(base, 'Base URL')),
      h('pre', { class: 'snippet', 'aria-label': 'Example' },
        `export OPENAI_BASE_URL=${base}\nexport OPENAI_API_KEY=mb_…   # create one under API keys\n\n`
        + `curl $OPENAI_BASE_URL/chat/completions \\\n  -H "Authorization: Bearer $OPENAI_API_KEY" \\\n`
        + '  -H "Content-Type: application/json" \\\n'
        + `  -d '{"model": "${model}",\n       "messages": [{"role": "user", "content": "Hello"}]}'`),
      h('p', {}, h('a', { class: 'btn', href: `/teams/${enc(ctx.teamId)}/keys` }, 'Create an API key'))));
}

function policies(ctx) {
  const t = ctx.team;
  const blocked = t.model_restrictions || [];
  const rows = [
    ['Team spending limit', t.spending_limit_usd === null ? 'None' : `${usd(t.spending_limit_usd)} per month`],
    ['Default member limit', t.default_member_limit_usd === null ? 'None' : `${usd(t.default_member_limit_usd)} per month`],
    ['When a member reaches it', t.default_enforcement === 'soft' ? 'Warn, keep serving (soft)' : 'Refuse requests (hard)'],
    ['Blocked models', blocked.length ? blocked.join(', ') : 'None: every configured model is available'],
  ];
  if (Number(t.discount_bps)) rows.push(['Discount', `${(Number(t.discount_bps) / 100).toFixed(2)}%`]);
  return card('Team policies', null,
    h('dl', { class: 'facts' }, rows.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v)))),
    { actions: ctx.can.managePolicies ? h('a', { class: 'btn small', href: `/teams/${enc(ctx.teamId)}/settings` }, 'Change') : null });
}

function yourLimit(ctx, member) {
  if (!member) return null;
  const limit = member.effective_limit_usd ?? member.monthly_limit_usd ?? ctx.team.default_member_limit_usd;
  const spent = member.spend_this_period_usd;
  const none = limit === null || limit === undefined;
  const reached = !none && percent(spent, limit) >= 100;
  const consequence = member.enforcement === 'soft' ? 'reached: requests get a warning' : 'reached: requests are refused';
  return stat('Your spend this period', usd(spent), {
    key: 'your-spend', title: spent,
    hint: none ? 'No limit for you' : `of ${usd(limit)} limit${reached ? ` · ${consequence}` : ''}`,
    meter: none ? undefined : percent(spent, limit),
  });
}

export async function render(ctx) {
  const t = ctx.team;
  const base = `/teams/${enc(ctx.teamId)}`;
  const [membersBody, models] = await Promise.all([
    optional(`/api/teams/${enc(ctx.teamId)}/members`, { data: [] }),
    optional('/api/models', { data: [] }),
  ]);
  const blocked = new Set(t.model_restrictions || []);
  const model = (models.data || []).map((m) => m.id).find((id) => !blocked.has(id)) || 'gpt-4o-mini';
  const me = (membersBody.data || []).find((m) => (m.user_id || m.id) === ctx.me.id);
  const limit = t.spending_limit_usd;
  const stats = h('div', { class: 'stats grid-3' },
    stat('Balance', usd(t.balance_usd), { key: 'balance', title: t.balance_usd, hint: 'Allowance left + credits' }),
    stat('Allowance left', usd(t.allowance_left_usd), {
      key: 'allowance', title: t.allowance_left_usd,
      hint: Number(t.seats) ? `of ${usd(t.allowance_usd)} this month` : 'No subscription',
      meter: t.allowance_usd && t.allowance_usd !== '0.000000000' ? percent(t.allowance_left_usd, t.allowance_usd) : undefined,
      meterNeutral: true, meterLabel: 'Allowance left this month',
    }),
    stat('Credits', usd(t.credits_usd), { key: 'credits', title: t.credits_usd, hint: 'Prepaid, carried over' }),
    stat('Spend this period', usd(t.spend_this_period_usd), {
      key: 'spend', title: t.spend_this_period_usd,
      hint: limit === null ? `${t.period || 'This month'} · no spending limit` : `${t.period || 'This month'} · limit ${usd(limit)}`,
      meter: limit === null ? undefined : percent(t.spend_this_period_usd, limit),
    }),
    stat('Members', String(t.member_count), { key: 'members', href: `${base}/members`, hint: 'See everyone’s spend' }),
    ctx.can.manageMembers ? stat('Join requests', String(t.pending_join_requests || 0), {
      key: 'join-requests', href: `${base}/members#join-requests`,
      hint: Number(t.pending_join_requests) ? 'Waiting for your approval' : 'Nothing waiting',
    }) : yourLimit(ctx, me));
  return {
    title: 'Overview',
    body: [
      pageHead(t.name, `${plural(t.member_count, 'member')} · you are ${ctx.role === 'owner' ? 'the owner' : `${ctx.role === 'admin' ? 'an' : 'a'} ${ctx.role}`}`),
      h('div', { class: 'stack' }, stats, h('div', { class: 'two-col' }, quickStart(ctx, model), policies(ctx))),
    ],
  };
}
