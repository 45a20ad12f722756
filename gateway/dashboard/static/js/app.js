// The dashboard's entry point: routing on location.pathname, the shell (sidebar with the team
// switcher), and the context every page renders from.

import { api, ApiError, enc } from './api.js';
import { h, swap } from './dom.js';
import { button, errorMessage, notice, pageHead } from './ui.js';
import * as auth from './pages/auth.js';
import * as overview from './pages/overview.js';
import * as members from './pages/members.js';
import * as usage from './pages/usage.js';
import * as keys from './pages/keys.js';
import * as settings from './pages/settings.js';
import * as billing from './pages/billing.js';
import * as personal from './pages/personal.js';

const STAFF = ['owner', 'admin'];
const LAST_TEAM = 'mb:lastTeam';

/** The role matrix of the contract (section 3), for what to offer; the API enforces it too. */
export function permissions(role) {
  const staff = STAFF.includes(role);
  const owner = role === 'owner';
  return {
    manageAllKeys: staff, manageMembers: staff, managePolicies: staff, viewBilling: staff,
    viewAudit: staff, manageBilling: owner, transfer: owner, deleteTeam: owner,
  };
}

const TEAM_PAGES = [
  { slug: '', label: 'Overview', module: overview, allowed: () => true },
  { slug: 'members', label: 'Members', module: members, allowed: () => true },
  { slug: 'usage', label: 'Usage', module: usage, allowed: () => true },
  { slug: 'keys', label: 'API keys', module: keys, allowed: () => true },
  { slug: 'settings', label: 'Settings', module: settings, allowed: (can) => can.managePolicies },
  { slug: 'billing', label: 'Billing', module: billing, allowed: (can) => can.viewBilling },
];

const state = { me: null, shell: null, seq: 0, lastPath: null };

// --- navigation ----------------------------------------------------------------------------------
export function navigate(path, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', path);
  else history.pushState(null, '', path);
  route();
}

function onLinkClick(event) {
  if (event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
  const link = event.target.closest('a[href]');
  if (!link || link.target || link.hasAttribute('download') || link.dataset.external !== undefined) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/api/') || url.pathname.startsWith('/static/')) return;
  event.preventDefault();
  if (url.pathname + url.search !== location.pathname + location.search) navigate(url.pathname + url.search);
}

function match(path) {
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (parts[0] === 'login' && parts.length === 1) return { view: auth.login, public: true };
  if (parts[0] === 'signup' && parts.length === 1) return { view: auth.signup, public: true };
  if (parts[0] === 'invite' && parts.length === 2) return { view: auth.invite, public: true, params: { token: parts[1] } };
  if (parts[0] === 'join' && parts.length === 2) return { view: auth.join, public: true, params: { token: parts[1] } };
  if (parts.length === 0) return { view: overview.home };
  if (parts[0] === 'me' && parts.length === 1) return { view: personal };
  if (parts[0] === 'teams' && parts[1] === 'new' && parts.length === 2) return { view: overview.newTeam };
  if (parts[0] === 'teams' && parts.length <= 3 && parts[1]) {
    const page = TEAM_PAGES.find((p) => p.slug === (parts[2] || ''));
    if (page) return { view: page.module, team: parts[1], page };
  }
  return null;
}

async function loadMe() {
  try {
    state.me = await api.get('/api/me');
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) state.me = null;
    else throw err;
  }
  return state.me;
}

function progress() {
  const bar = h('div', { class: 'progress', 'aria-hidden': 'true' });
  const timer = setTimeout(() => document.body.append(bar), 150);
  return () => { clearTimeout(timer); bar.remove(); };
}

export async function route({ keepFocus = false } = {}) {
  const seq = ++state.seq;
  const path = location.pathname;
  const found = match(path);
  const done = progress();
  try {
    if (state.me === null || state.seq === 1) await loadMe();
    if (seq !== state.seq) return;
    if (!found) {
      mount(found, { title: 'Not found', body: [notFound()] }, keepFocus);
      return;
    }
    if (!found.public && !state.me) {
      navigate(`/login?next=${enc(path + location.search)}`, { replace: true });
      return;
    }
    const ctx = await context(found);
    if (seq !== state.seq) return;
    const result = await found.view.render(ctx);
    if (seq !== state.seq || result === null) return;
    mount(found, result, keepFocus || path === state.lastPath);
    state.lastPath = path;
  } catch (err) {
    if (seq !== state.seq) return;
    mount(found && !found.public ? found : null, { title: 'Error', body: [failure(err)] }, keepFocus);
  } finally {
    done();
  }
}

async function context(found) {
  const ctx = {
    me: state.me, params: found.params || {}, query: new URLSearchParams(location.search),
    navigate, reload: () => route({ keepFocus: true }), refreshMe: loadMe, permissions,
    logout: async () => {
      try {
        await api.post('/api/auth/logout');
      } finally {
        state.me = null;
        state.shell = null;
      }
    },
  };
  if (found.team) {
    let team;
    try {
      team = await api.get(`/api/teams/${enc(found.team)}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        localStorage.removeItem(LAST_TEAM);
        throw new ApiError(404, null, 'This team does not exist, or you are not a member of it.');
      }
      throw err;
    }
    ctx.team = team;
    ctx.teamId = team.id;
    ctx.role = team.your_role;
    ctx.can = permissions(team.your_role);
    ctx.page = found.page;
    state.pendingJoin = Number(team.pending_join_requests || 0);
    localStorage.setItem(LAST_TEAM, team.id);
    if (!found.page.allowed(ctx.can)) {
      throw new ApiError(403, null, `${found.page.label} is for team owners and admins; your role is ${team.your_role}.`);
    }
  }
  return ctx;
}

// --- rendering -----------------------------------------------------------------------------------
function mount(found, result, keepFocus) {
  const root = document.getElementById('app');
  root.removeAttribute('aria-busy');
  document.title = [result.title, found && found.team ? currentTeamName(found.team) : null, 'ModelBridge']
    .filter(Boolean).join(' · ');
  if (!found || found.public || !state.me) {
    state.shell = null;
    swap(root, h('main', { id: 'main', class: 'auth', tabindex: '-1' }, result.body));
    if (!keepFocus) focusHeading(root);
    return;
  }
  if (!state.shell) {
    state.shell = { sidebar: h('aside', { class: 'sidebar', id: 'sidebar' }), main: h('main', { id: 'main', tabindex: '-1' }) };
    const toggle = h('button', { type: 'button', class: 'btn small menu-toggle', 'aria-expanded': 'false', 'aria-controls': 'sidebar' }, 'Menu');
    const shell = h('div', { class: 'shell' },
      h('header', { class: 'topbar' },
        h('a', { class: 'brand', href: '/' }, h('img', { src: '/static/icon.svg', alt: '' }), 'ModelBridge'), toggle),
      h('div', { class: 'sidebar-col' }, state.shell.sidebar), state.shell.main);
    // Narrow screens: the sidebar is a menu behind this button (CSS shows it at <= 900 px).
    toggle.addEventListener('click', () => menu(!shell.classList.contains('menu-open')));
    state.shell.menu = (open) => {
      shell.classList.toggle('menu-open', open);
      toggle.setAttribute('aria-expanded', String(open));
    };
    root.replaceChildren(shell);
  }
  menu(false);
  renderSidebar(found);
  swap(state.shell.main, result.body);
  if (!keepFocus) {
    window.scrollTo(0, 0);
    focusHeading(state.shell.main);
  }
}

function menu(open) {
  if (state.shell && state.shell.menu) state.shell.menu(open);
}

function focusHeading(container) {
  const heading = container.querySelector('h1');
  if (heading) heading.focus({ preventScroll: true });
}

function currentTeamName(teamId) {
  const team = (state.me?.teams || []).find((t) => t.id === teamId);
  return team ? team.name : null;
}

function activeTeamId(found) {
  const teams = state.me?.teams || [];
  if (found && found.team) return found.team;
  const last = localStorage.getItem(LAST_TEAM);
  if (teams.some((t) => t.id === last)) return last;
  return teams.length ? teams[0].id : null;
}

function renderSidebar(found) {
  const teams = state.me.teams || [];
  const teamId = activeTeamId(found);
  const team = teams.find((t) => t.id === teamId);
  const can = permissions(team ? team.role : null);
  const currentSlug = found && found.page ? found.page.slug : null;
  const link = (href, label, current, extra) => h('a', { href, 'aria-current': current ? 'page' : undefined }, h('span', {}, label), extra || null);

  const switcher = teams.length ? h('div', { class: 'switcher' },
    h('label', { for: 'team-switch' }, 'Team'),
    h('select', { id: 'team-switch', onChange: (e) => {
      const next = teams.find((t) => t.id === e.target.value);
      const page = TEAM_PAGES.find((p) => p.slug === currentSlug && p.allowed(permissions(next.role)));
      navigate(`/teams/${enc(next.id)}${page && page.slug ? `/${page.slug}` : ''}`);
    } }, teams.map((t) => h('option', { value: t.id, selected: t.id === teamId }, t.name)))) : null;

  const pending = found && found.team && can.manageMembers ? state.pendingJoin || 0 : 0;
  const teamNav = team ? h('nav', { class: 'nav', 'aria-label': `Team ${team.name}` },
    TEAM_PAGES.filter((p) => p.allowed(can)).map((p) => link(
      `/teams/${enc(team.id)}${p.slug ? `/${p.slug}` : ''}`, p.label,
      found && found.team === team.id && currentSlug === p.slug,
      p.slug === 'members' && pending ? h('span', { class: 'count', title: 'Pending join requests' }, String(pending)) : null))) : null;

  const onNew = found && found.view === overview.newTeam;
  swap(state.shell.sidebar,
    h('a', { class: 'brand', href: '/' }, h('img', { src: '/static/icon.svg', alt: '' }), 'ModelBridge'),
    switcher,
    teamNav,
    h('nav', { class: 'nav', 'aria-label': 'Account' },
      h('p', { class: 'nav-title' }, 'You'),
      link('/me', 'Personal', found && found.view === personal),
      link('/teams/new', 'New team', onNew)),
    h('div', { class: 'sidebar-foot' },
      h('div', { class: 'who' }, h('strong', {}, state.me.name), h('span', {}, state.me.email)),
      button('Log out', logout, { kind: 'link', size: 'small' })));
}

async function logout() {
  try {
    await api.post('/api/auth/logout');
  } finally {
    state.me = null;
    state.shell = null;
    navigate('/login');
  }
}

function notFound() {
  return h('div', { class: 'stack' },
    pageHead('Page not found', 'There is nothing at this address.'),
    h('p', {}, h('a', { href: '/' }, 'Go to your dashboard')));
}

function failure(err) {
  const forbidden = err instanceof ApiError && (err.status === 403 || err.status === 404);
  return h('div', { class: 'stack' },
    pageHead(forbidden ? 'Not available' : 'Something went wrong'),
    notice(forbidden ? 'warn' : 'danger', h('p', {}, errorMessage(err))),
    h('div', { class: 'row' },
      forbidden ? null : button('Try again', () => route({ keepFocus: true }), { kind: 'primary' }),
      h('a', { class: 'btn', href: '/' }, 'Back to the dashboard')));
}

// --- start ---------------------------------------------------------------------------------------
function start() {
  document.addEventListener('click', onLinkClick);
  window.addEventListener('popstate', () => route());
  window.addEventListener('mb:unauthenticated', () => {
    if (!state.me) return;
    state.me = null;
    state.shell = null;
    const path = location.pathname;
    if (!match(path)?.public) navigate(`/login?next=${enc(path + location.search)}`, { replace: true });
  });
  route({ keepFocus: true });
}

start();
