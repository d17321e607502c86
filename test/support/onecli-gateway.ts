import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';

/**
 * A local stand-in for the OneCLI gateway. It serves the two endpoints that
 * `@onecli-sh/sdk` 2.2.1 calls for `ensureAgent` and `applyContainerConfig`:
 *
 * - `POST /v1/agents` with `{ name, identifier }`: 201 with the new agent, 409
 *   when the identifier exists (the SDK's ensureAgent treats 409 as success),
 *   400 when the identifier breaks the gateway's documented rule.
 * - `GET /v1/container-config?agent=ID`: 200 with `{ env, caCertificate,
 *   caCertificateContainerPath, credentialStubs }`, 404 for an agent that was
 *   never created.
 */

/** One request as the gateway received it. */
export interface GatewayCall {
  method: string;
  /** Path with its query string, such as `/v1/container-config?agent=team-a`. */
  path: string;
  /** Parsed JSON body, or undefined when the request had none. */
  body: unknown;
  authorization: string | undefined;
}

/** The container configuration that `GET /v1/container-config` returns. */
export interface GatewayContainerConfig {
  env: Record<string, string>;
  caCertificate: string;
  caCertificateContainerPath: string;
  credentialStubs?: Array<{ containerPath: string; content: string }>;
}

export interface FakeGateway {
  /** Base URL to pass to the SDK, such as `http://127.0.0.1:40123`. */
  url: string;
  /** Every request received, in order, including those that got a failure response. */
  calls: GatewayCall[];
  /** Makes the next `count` requests, whatever their endpoint, fail with `status` (503 unless given). */
  failNext(count: number, status?: number): void;
  /**
   * While `withhold` is true, container-config requests get 503. The SDK's
   * applyContainerConfig then resolves `false`, its only "no credentials"
   * outcome. Agent creation keeps working.
   */
  withholdCredentials(withhold: boolean): void;
  /** Stops the server and drops open keep-alive connections. */
  close(): Promise<void>;
}

/** Proxy URL that carries a per-agent token, as a credential-bearing proxy would. */
export const FAKE_PROXY_URL = 'http://berth-agent:proxy-token-123@host.docker.internal:10255';
export const FAKE_OAUTH_TOKEN = 'placeholder-oauth-token';

export const DEFAULT_CONTAINER_CONFIG: GatewayContainerConfig = {
  env: {
    HTTPS_PROXY: FAKE_PROXY_URL,
    HTTP_PROXY: FAKE_PROXY_URL,
    NODE_EXTRA_CA_CERTS: '/tmp/onecli-proxy-ca.pem',
    CLAUDE_CODE_OAUTH_TOKEN: FAKE_OAUTH_TOKEN,
  },
  caCertificate: '-----BEGIN CERTIFICATE-----\nZmFrZSBnYXRld2F5IENB\n-----END CERTIFICATE-----\n',
  caCertificateContainerPath: '/tmp/onecli-proxy-ca.pem',
};

// The identifier rule the SDK's README documents for the gateway.
const IDENTIFIER_PATTERN = /^[a-z0-9][a-z0-9-]{0,49}$/;

/** Starts a fake gateway on 127.0.0.1 with an OS-chosen port. */
export async function start(config: GatewayContainerConfig = DEFAULT_CONTAINER_CONFIG): Promise<FakeGateway> {
  const calls: GatewayCall[] = [];
  const agents = new Set<string>();
  let failuresLeft = 0;
  let failureStatus = 503;
  let withheld = false;

  const server = createServer((request, response) => {
    void readBody(request).then(
      (body) => {
        calls.push({
          method: request.method ?? '',
          path: request.url ?? '',
          body,
          authorization: request.headers.authorization,
        });

        if (failuresLeft > 0) {
          failuresLeft -= 1;
          sendJson(response, failureStatus, { error: 'gateway unavailable' });
          return;
        }
        route(request, body, response);
      },
      (error: unknown) => sendJson(response, 400, { error: String(error) }),
    );
  });

  function route(request: IncomingMessage, body: unknown, response: ServerResponse): void {
    const url = new URL(request.url ?? '/', 'http://gateway');

    if (request.method === 'POST' && url.pathname === '/v1/agents') {
      createAgent(body, response);
      return;
    }
    if (request.method === 'GET' && url.pathname === '/v1/container-config') {
      sendContainerConfig(url.searchParams.get('agent'), response);
      return;
    }
    sendJson(response, 404, { error: `no route for ${request.method} ${url.pathname}` });
  }

  function createAgent(body: unknown, response: ServerResponse): void {
    const { name, identifier } = (body ?? {}) as { name?: unknown; identifier?: unknown };
    if (typeof name !== 'string' || name === '' || typeof identifier !== 'string') {
      sendJson(response, 400, { error: 'name and identifier are required' });
      return;
    }
    if (!IDENTIFIER_PATTERN.test(identifier)) {
      sendJson(response, 400, { error: `invalid identifier ${identifier}` });
      return;
    }
    if (agents.has(identifier)) {
      sendJson(response, 409, { error: `agent ${identifier} exists` });
      return;
    }

    agents.add(identifier);
    sendJson(response, 201, {
      id: `agent-${agents.size}`,
      name,
      identifier,
      createdAt: new Date().toISOString(),
    });
  }

  function sendContainerConfig(agent: string | null, response: ServerResponse): void {
    if (agent !== null && !agents.has(agent)) {
      sendJson(response, 404, { error: `unknown agent ${agent}` });
      return;
    }
    if (withheld) {
      sendJson(response, 503, { error: 'no credentials available' });
      return;
    }
    sendJson(response, 200, config);
  }

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    calls,
    failNext(count, status = 503) {
      failuresLeft = count;
      failureStatus = status;
    },
    withholdCredentials(withhold) {
      withheld = withhold;
    },
    close() {
      return new Promise((resolve, reject) => {
        server.close((error) => (error ? reject(error) : resolve()));
        server.closeAllConnections();
      });
    },
  };
}

async function readBody(request: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  for await (const chunk of request) {
    chunks.push(chunk as Buffer);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  return text === '' ? undefined : (JSON.parse(text) as unknown);
}

function sendJson(response: ServerResponse, status: number, payload: unknown): void {
  response.writeHead(status, { 'content-type': 'application/json' });
  response.end(JSON.stringify(payload));
}
