// Signing up, logging in, accepting an invitation and asking to join from a public link. These
// pages show without the sidebar, as one centred card.

import { api, ApiError, enc } from '../api.js';
import { h, uid } from '../dom.js';
import { button, errorMessage, field, form, notice, roleBadge, sentence, submit, toast } from '../ui.js';

function safeNext(ctx) {
  const next = ctx.query.get('next') || '/';
  return next.startsWith('/') && !next.startsWith('//') ? next : '/';
}

function authPage(title, ...children) {
  return h('div', { class: 'auth-card' },
    h('div', { class: 'auth-brand' }, h('img', { src: '/static/icon.svg', alt: '' }), 'ModelBridge'),
    h('section', { class: 'card', 'aria-labelledby': 'auth-title' },
      h('div', { class: 'card-body' }, h('h1', { id: 'auth-title', tabindex: '-1' }, title), children)));
}

async function logIn(ctx, email, password) {
  await api.post('/api/auth/login', { email, password });
  await ctx.refreshMe();
}

function loginForm(ctx, { email, locked, label = 'Log in', after }) {
  return form({ 'aria-label': 'Log in' }, [
    field('email', 'Email', { type: 'email', value: email, required: true, autocomplete: 'username', readOnly: locked }),
    field('password', 'Password', { type: 'password', required: true, autocomplete: 'current-password' }),
    submit(label),
  ], async (v) => {
    await logIn(ctx, v.email, v.password);
    await after();
  });
}

function signupForm(ctx, { email, locked, label = 'Create account', after }) {
  return form({ 'aria-label': 'Create an account' }, [
    field('name', 'Your name', { autocomplete: 'name', required: true }),
    field('email', 'Email', { type: 'email', value: email, required: true, autocomplete: 'username', readOnly: locked }),
    field('password', 'Password', { type: 'password', required: true, minlength: 8, autocomplete: 'new-password', hint: 'At least 8 characters.' }),
    submit(label),
  ], async (v) => {
    await api.post('/api/auth/signup', { name: v.name, email: v.email, password: v.password });
    await logIn(ctx, v.email, v.password);
    await after();
  });
}

/** Accessible tabs: "Create account" / "I have an account". */
function tabs(panels) {
  const ids = panels.map(() => uid('tab'));
  const tabButtons = panels.map((p, i) => h('button', {
    type: 'button', role: 'tab', id: ids[i], 'aria-controls': `${ids[i]}-panel`,
    'aria-selected': i === 0 ? 'true' : 'false', tabindex: i === 0 ? '0' : '-1',
  }, p.label));
  const bodies = panels.map((p, i) => h('div', { role: 'tabpanel', id: `${ids[i]}-panel`, 'aria-labelledby': ids[i], hidden: i !== 0 }, p.body));
  const select = (index, focus) => {
    tabButtons.forEach((b, i) => {
      b.setAttribute('aria-selected', String(i === index));
      b.tabIndex = i === index ? 0 : -1;
      bodies[i].hidden = i !== index;
    });
    if (focus) tabButtons[index].focus();
  };
  tabButtons.forEach((b, i) => {
    b.addEventListener('click', () => select(i, false));
    b.addEventListener('keydown', (e) => {
      if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
        e.preventDefault();
        select((i + (e.key === 'ArrowRight' ? 1 : panels.length - 1)) % panels.length, true);
      }
    });
  });
  return [h('div', { class: 'tabs', role: 'tablist' }, tabButtons), ...bodies];
}

// --- log in / sign up ----------------------------------------------------------------------------
export const login = {
  async render(ctx) {
    const next = safeNext(ctx);
    if (ctx.me) {
      ctx.navigate(next, { replace: true });
      return null;
    }
    const signupHref = next === '/' ? '/signup' : `/signup?next=${enc(next)}`;
    return {
      title: 'Log in',
      body: [authPage('Log in',
        loginForm(ctx, { after: () => ctx.navigate(next, { replace: true }) }),
        h('p', { class: 'auth-foot' }, 'New to ModelBridge? ', h('a', { href: signupHref }, 'Create an account')))],
    };
  },
};

export const signup = {
  async render(ctx) {
    const next = safeNext(ctx);
    if (ctx.me) {
      ctx.navigate(next, { replace: true });
      return null;
    }
    const loginHref = next === '/' ? '/login' : `/login?next=${enc(next)}`;
    return {
      title: 'Create an account',
      body: [authPage('Create your account',
        h('p', { class: 'muted' }, 'One account for your personal keys and every team you join.'),
        signupForm(ctx, { after: () => ctx.navigate(next === '/' ? '/teams/new' : next, { replace: true }) }),
        h('p', { class: 'auth-foot' }, 'Already have an account? ', h('a', { href: loginHref }, 'Log in')))],
    };
  },
};

// --- invitations ---------------------------------------------------------------------------------
function invitationFacts(inv) {
  const team = inv.team && typeof inv.team === 'object' ? inv.team : {};
  return {
    teamId: team.id || inv.team_id,
    teamName: team.name || inv.team_name || 'a team',
    role: inv.role || 'member',
    email: inv.email || '',
    inviter: (inv.invited_by && (inv.invited_by.name || inv.invited_by.email)) || inv.invited_by_name || inv.inviter_name || null,
  };
}

function unusable(title, message) {
  return {
    title,
    body: [authPage(title,
      notice('warn', h('p', {}, message)),
      h('p', { class: 'auth-foot' }, h('a', { href: '/' }, 'Go to the dashboard')))],
  };
}

export const invite = {
  async render(ctx) {
    const token = ctx.params.token;
    let inv;
    try {
      inv = await api.get(`/api/invitations/${enc(token)}`);
    } catch (err) {
      if (err instanceof ApiError && [404, 410].includes(err.status)) {
        return unusable('Invitation not valid', `${sentence(err.message)} Invitations work once and expire; ask the team for a new one.`);
      }
      throw err;
    }
    const facts = invitationFacts(inv);
    const accept = async () => {
      const res = await api.post(`/api/invitations/${enc(token)}/accept`);
      await ctx.refreshMe();
      toast(`Welcome to ${facts.teamName}.`);
      const teamId = facts.teamId || res?.team_id || res?.team?.id || res?.id;
      ctx.navigate(teamId ? `/teams/${enc(teamId)}` : '/', { replace: true });
    };
    const intro = h('p', {},
      facts.inviter ? `${facts.inviter} invited ` : 'You are invited: ',
      h('strong', {}, facts.email || 'you'), ' to join ', h('strong', {}, facts.teamName), ' as ', roleBadge(facts.role), '.');
    let action;
    if (ctx.me && facts.email && ctx.me.email.toLowerCase() !== facts.email.toLowerCase()) {
      action = [
        notice('warn', h('p', {}, `You are logged in as ${ctx.me.email}, but this invitation is for ${facts.email}. Log out, then log in or sign up with ${facts.email}.`)),
        button('Log out and continue', async () => { await ctx.logout(); ctx.reload(); }, { kind: 'primary' }),
      ];
    } else if (ctx.me) {
      action = [
        h('p', { class: 'muted' }, `You are logged in as ${ctx.me.email}.`),
        form({ 'aria-label': 'Accept the invitation' }, [submit(`Join ${facts.teamName}`)], accept),
      ];
    } else {
      action = tabs([
        { label: 'Create account', body: signupForm(ctx, { email: facts.email, locked: Boolean(facts.email), label: `Create account and join`, after: accept }) },
        { label: 'I have an account', body: loginForm(ctx, { email: facts.email, locked: Boolean(facts.email), label: 'Log in and join', after: accept }) },
      ]);
    }
    return { title: `Join ${facts.teamName}`, body: [authPage(`Join ${facts.teamName}`, intro, action)] };
  },
};

// --- public invite link ------------------------------------------------------------------------------
export const join = {
  async render(ctx) {
    const token = ctx.params.token;
    const result = h('div', { role: 'status', 'aria-live': 'polite' });
    const request = async () => {
      let res;
      try {
        res = await api.post(`/api/join/${enc(token)}`);
      } catch (err) {
        result.replaceChildren(notice('danger', h('p', {}, errorMessage(err))));
        return;
      }
      const teamName = (res && (res.team_name || (res.team && res.team.name))) || 'the team';
      actions.replaceChildren();
      result.replaceChildren(notice('success',
        h('p', {}, h('strong', {}, 'Request sent. '), `An owner or admin of ${teamName} will review it; the team appears in your dashboard once they approve.`),
        h('p', {}, h('a', { href: '/' }, 'Go to your dashboard'))));
    };
    let actions;
    if (ctx.me) {
      actions = h('div', { class: 'stack' },
        h('p', { class: 'muted' }, `You are logged in as ${ctx.me.email}.`),
        button('Request to join', request, { kind: 'primary wide' }));
    } else {
      actions = h('div', { class: 'stack' }, tabs([
        { label: 'Create account', body: signupForm(ctx, { label: 'Create account and ask to join', after: async () => { ctx.reload(); } }) },
        { label: 'I have an account', body: loginForm(ctx, { label: 'Log in and continue', after: async () => { ctx.reload(); } }) },
      ]));
    }
    return {
      title: 'Request to join a team',
      body: [authPage('Request to join a team',
        h('p', {}, 'Someone shared a team link with you. Send a request and an owner or admin of the team will let you in.'),
        actions, result)],
    };
  },
};
