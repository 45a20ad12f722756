// The JSON API client: same-origin fetch with the session cookie and the CSRF header.

export class ApiError extends Error {
  constructor(status, body, fallback) {
    const err = body && typeof body === 'object' && body.error ? body.error : {};
    super(err.message || fallback || `The gateway answered ${status}.`);
    this.name = 'ApiError';
    this.status = status;
    this.code = err.code || null;
    this.param = err.param || null;
  }
}

const CSRF_COOKIE = 'mb_csrf';

function readCookie(name) {
  for (const part of document.cookie.split(';')) {
    const [key, ...rest] = part.trim().split('=');
    if (key === name) return decodeURIComponent(rest.join('='));
  }
  return '';
}

async function csrfToken() {
  let token = readCookie(CSRF_COOKIE);
  if (!token) {
    // The page sets it; if it was cleared since, a HEAD of the page hands out a new one.
    await fetch('/', { method: 'HEAD', credentials: 'same-origin' });
    token = readCookie(CSRF_COOKIE);
  }
  return token;
}

export async function request(method, path, body) {
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  if (method !== 'GET' && method !== 'HEAD') headers['x-csrf-token'] = await csrfToken();
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    throw new ApiError(0, null, 'Could not reach the gateway. Check that it is running and try again.');
  }
  const type = res.headers.get('content-type') || '';
  const data = type.includes('application/json') ? await res.json().catch(() => null) : await res.text();
  if (!res.ok) {
    const error = new ApiError(res.status, data);
    if (res.status === 401 && error.code === 'unauthenticated') {
      window.dispatchEvent(new CustomEvent('mb:unauthenticated', { detail: error }));
    }
    throw error;
  }
  return data;
}

export const api = {
  get: (path) => request('GET', path),
  post: (path, body = {}) => request('POST', path, body),
  put: (path, body = {}) => request('PUT', path, body),
  patch: (path, body = {}) => request('PATCH', path, body),
  del: (path) => request('DELETE', path),
};

/** Fetch, but turn "this endpoint does not exist (yet)" / "not allowed" into `fallback`. */
export async function optional(path, fallback) {
  try {
    return await api.get(path);
  } catch (err) {
    if (err instanceof ApiError && [403, 404, 405].includes(err.status)) return fallback;
    throw err;
  }
}

export function qs(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

export const enc = encodeURIComponent;
