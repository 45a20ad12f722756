// Usage reports: a date range, spend per day as a chart, a breakdown by member, model, key or
// tag, and the same report as CSV. Also used by the personal page for /api/me/usage.

import { api, enc, qs } from '../api.js';
import { spendChart } from '../chart.js';
import { h, swap, uid } from '../dom.js';
import { exact, usd } from '../money.js';
import { card, field, form, money, pageHead, stat, submit, table, utcToday } from '../ui.js';
import { keyLimitsCard } from './keys.js';

const GROUPS = {
  member: { label: 'Member', column: 'Member' },
  model: { label: 'Model', column: 'Model' },
  key: { label: 'API key', column: 'Key' },
  tag: { label: 'Tag', column: 'Tag' },
};
const num = new Intl.NumberFormat();

function monthStart(day) {
  return `${day.slice(0, 8)}01`;
}

function shiftMonth(day, delta) {
  const d = new Date(`${monthStart(day)}T00:00:00Z`);
  d.setUTCMonth(d.getUTCMonth() + delta);
  return d.toISOString().slice(0, 10);
}

function addDays(day, delta) {
  return new Date(Date.parse(`${day}T00:00:00Z`) + delta * 86400000).toISOString().slice(0, 10);
}

export function presets() {
  const today = utcToday();
  const lastMonthStart = shiftMonth(today, -1);
  return [
    ['This month', monthStart(today), today],
    ['Last month', lastMonthStart, addDays(monthStart(today), -1)],
    ['Last 7 days', addDays(today, -6), today],
    ['Last 30 days', addDays(today, -29), today],
  ];
}

function groupCell(groupBy, row, people) {
  if (groupBy === 'tag' && (row.group === null || row.group === undefined)) return h('span', { class: 'muted' }, '(no tag)');
  if (groupBy === 'member') {
    const person = people.get(row.group);
    return h('div', {},
      h('div', { class: 'primary' }, person ? person.name : row.label || row.group),
      h('div', { class: 'secondary' }, person ? person.email : 'no longer a member'));
  }
  if (groupBy === 'key') return h('div', { class: 'primary' }, row.label || row.group);
  return groupBy === 'model' ? h('code', {}, row.group) : row.group;
}

function breakdown(groupBy, report, people) {
  const rows = report.data || [];
  const total = report.total || {};
  const discount = rows.some((r) => r.discount_usd && !/^0\.0+$/.test(r.discount_usd));
  const columns = [
    { label: GROUPS[groupBy].column, cell: (r) => groupCell(groupBy, r, people), total: 'Total' },
    { label: 'Requests', num: true, cell: (r) => num.format(r.requests), total: num.format(total.requests || 0) },
    { label: 'Prompt tokens', num: true, cell: (r) => num.format(r.prompt_tokens), total: num.format(total.prompt_tokens || 0) },
    { label: 'Completion tokens', num: true, cell: (r) => num.format(r.completion_tokens), total: num.format(total.completion_tokens || 0) },
    discount ? { label: 'List cost', num: true, cell: (r) => money(r.list_cost_usd), total: money(total.list_cost_usd) } : null,
    discount ? { label: 'Discount', num: true, cell: (r) => money(r.discount_usd), total: money(total.discount_usd) } : null,
    { label: 'Charged', num: true, cell: (r) => money(r.charged_usd), total: money(total.charged_usd) },
  ].filter(Boolean);
  return table(columns, rows, {
    caption: `Usage by ${GROUPS[groupBy].label.toLowerCase()}`,
    rowKey: (r) => String(r.group),
    foot: (c) => c.total,
    empty: h('div', { class: 'empty' }, h('strong', {}, 'No requests in this range'),
      h('p', {}, 'Requests made with this team’s keys show up here within a few seconds.')),
  });
}

function summary(report) {
  const t = report.total || {};
  const tokens = Number(t.prompt_tokens || 0) + Number(t.completion_tokens || 0);
  return h('div', { class: 'stats' },
    stat('Charged', usd(t.charged_usd ?? '0'), { key: 'charged', title: exact(t.charged_usd ?? '0') }),
    stat('Requests', num.format(t.requests || 0), { key: 'requests' }),
    stat('Tokens', num.format(tokens), { key: 'tokens', hint: `${num.format(t.prompt_tokens || 0)} prompt · ${num.format(t.completion_tokens || 0)} completion` }),
    t.discount_usd && !/^0\.0+$/.test(t.discount_usd) ? stat('Discount', usd(t.discount_usd), { key: 'discount', title: exact(t.discount_usd) }) : null);
}

function groupPicker(groups, current, onChange) {
  const name = uid('group');
  return h('div', { class: 'segmented', role: 'radiogroup', 'aria-label': 'Break down by' },
    groups.map((g) => h('label', {},
      h('input', { type: 'radio', name, value: g, checked: g === current, onChange: () => onChange(g) }),
      h('span', {}, GROUPS[g].label))));
}

/**
 * The whole report view. opts: endpoint (the usage URL), groups (allowed breakdowns), ctx,
 * title, sub, basePath (the page path that keeps the range in its query string), and keys
 * (the /api/keys URL whose keys with limits get a card of their own).
 */
export async function usageView(ctx, opts) {
  const q = ctx.query;
  const today = utcToday();
  const state = {
    from: /^\d{4}-\d{2}-\d{2}$/.test(q.get('from') || '') ? q.get('from') : monthStart(today),
    to: /^\d{4}-\d{2}-\d{2}$/.test(q.get('to') || '') ? q.get('to') : today,
    group: opts.groups.includes(q.get('group_by')) ? q.get('group_by') : opts.groups[0],
  };
  const slots = { summary: h('div'), chart: h('div'), table: h('div'), picker: h('div'), csv: h('a', { class: 'btn', download: '' }, 'Export CSV') };
  const people = new Map(((opts.members && (await opts.members)) || []).map((m) => [m.user_id, m]));
  const url = (params) => `${opts.endpoint}${qs({ from: state.from, to: state.to, ...params })}`;

  const remember = () => {
    history.replaceState(null, '', `${opts.basePath}${qs({ from: state.from, to: state.to, group_by: state.group })}`);
    slots.csv.href = url({ group_by: state.group, format: 'csv' });
    slots.csv.setAttribute('aria-label', `Export usage by ${GROUPS[state.group].label.toLowerCase()} as CSV`);
  };
  const loadBreakdown = async () => {
    const report = await api.get(url({ group_by: state.group }));
    swap(slots.table, breakdown(state.group, report, people));
    return report;
  };
  const loadAll = async () => {
    const [days, report] = await Promise.all([api.get(url({ group_by: 'day' })), loadBreakdown()]);
    swap(slots.summary, summary(report));
    swap(slots.chart, spendChart(days.data || [], days.from || state.from, days.to || state.to));
  };
  const pick = async (group) => {
    state.group = group;
    remember();
    await loadBreakdown();
  };
  swap(slots.picker, groupPicker(opts.groups, state.group, pick));
  remember();
  await loadAll();
  const limits = opts.keys ? await keyLimitsCard(opts.keys) : null;

  const rangeForm = form({ class: 'inline-form', 'aria-label': 'Date range' }, [
    field('from', 'From', { type: 'date', value: state.from, required: true, max: today }),
    field('to', 'To', { type: 'date', value: state.to, required: true }),
    submit('Show', 'primary'),
  ], async (v) => {
    state.from = v.from;
    state.to = v.to;
    remember();
    await loadAll();
  });
  const presetButtons = h('div', { class: 'row', role: 'group', 'aria-label': 'Quick ranges' }, presets().map(([label, from, to]) =>
    h('button', { type: 'button', class: 'btn small', onClick: () => {
      rangeForm.elements.from.value = from;
      rangeForm.elements.to.value = to;
      rangeForm.requestSubmit();
    } }, label)));

  return {
    title: opts.title,
    body: [
      pageHead(opts.title, opts.sub, slots.csv),
      h('div', { class: 'stack' },
        card(null, null, h('div', { class: 'stack' }, rangeForm, presetButtons)),
        slots.summary,
        limits,
        card('Spend per day', 'UTC days; the charged amount after any discount.', slots.chart),
        card('Breakdown', null, slots.table, { flush: true, actions: slots.picker })),
    ],
  };
}

export async function render(ctx) {
  return usageView(ctx, {
    endpoint: `/api/teams/${enc(ctx.teamId)}/usage`,
    basePath: `/teams/${enc(ctx.teamId)}/usage`,
    groups: ['member', 'model', 'key', 'tag'],
    keys: `/api/keys${qs({ team: ctx.teamId })}`,
    members: api.get(`/api/teams/${enc(ctx.teamId)}/members`).then((b) => b.data || [], () => []),
    title: 'Usage',
    sub: `Everything billed to ${ctx.team.name}. Members billed personally appear in their own reports.`,
  });
}
