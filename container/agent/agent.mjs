// berth's reference agent, which follows the container contract. It reads
// pending messages from inbound.db, which only the host writes, and claims each
// one in processing_ack. It replies "echo: <text>" in messages_out (only this
// agent writes outbound.db) and prints each reply between output markers on
// stdout. It touches the heartbeat file while it handles messages.
//
// It stops with exit code 0 when the close-request file appears or on SIGTERM,
// in both cases after finishing the message it is working on.
//
// Test knobs (environment variables) make it misbehave on purpose:
//   AGENT_MODE=contract-check   reply with a report of the contract's env and mounts
//   AGENT_HEARTBEAT=0           never touch the heartbeat file
//   AGENT_IGNORE_CLOSE_REQUEST=1  keep running after the close request appears
//   AGENT_IGNORE_SIGTERM=1      log SIGTERM and keep running
//   AGENT_DEFAULT_SIGTERM=1     install no SIGTERM handler, so SIGTERM ends the
//                               process by the signal (exit code 143 under an init)
//   AGENT_EXIT_AFTER_MS=N       exit with code 3 after N milliseconds
//   AGENT_ALLOCATE_MB=N         at start, allocate and hold N MiB of memory
//   AGENT_PRINT_MALFORMED=1     reply twice to each message and print an invalid
//                               output block between the two replies' blocks
//   AGENT_CRASH_ON_MESSAGE=1    claim a message, then exit with code 3 before replying
//   AGENT_HANG_ON_MESSAGE=1     claim a message, then never reply or return
//
// Plain JavaScript for Node.js 18 or newer. The only dependency is the sqlite3
// module, from Debian's node-sqlite3 or from npm.
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';

const POLL_INTERVAL_MS = 250;
const BUSY_TIMEOUT_MS = 5000;
const OUTPUT_START_MARKER = '---NANOCLAW_OUTPUT_START---';
const OUTPUT_END_MARKER = '---NANOCLAW_OUTPUT_END---';

// The same SQL as OUTBOUND_SCHEMA in berth's src/session/schema.ts.
const OUTBOUND_SCHEMA = `
CREATE TABLE IF NOT EXISTS messages_out (
  id            TEXT PRIMARY KEY,
  seq           INTEGER UNIQUE,
  in_reply_to   TEXT,
  timestamp     TEXT NOT NULL,
  deliver_after TEXT,
  recurrence    TEXT,
  kind          TEXT NOT NULL,
  platform_id   TEXT,
  channel_type  TEXT,
  thread_id     TEXT,
  content       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS processing_ack (
  message_id     TEXT PRIMARY KEY,
  status         TEXT NOT NULL,
  status_changed TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS session_state (
  key        TEXT PRIMARY KEY,
  value      TEXT NOT NULL,
  updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS container_state (
  id                       INTEGER PRIMARY KEY CHECK (id = 1),
  current_tool             TEXT,
  tool_declared_timeout_ms INTEGER,
  tool_started_at          TEXT,
  updated_at               TEXT NOT NULL
);
`;

// Environment variables that the contract-check report includes: these
// prefixes, plus the exact names below.
const REPORTED_ENV_PREFIXES = ['SESSION_', 'NANOCLAW_', 'AGENT_', 'ONECLI'];
const REPORTED_ENV_NAMES = ['TZ', 'HOME', 'HTTPS_PROXY', 'HTTP_PROXY', 'NODE_EXTRA_CA_CERTS'];
const REPORTED_PATHS = [
  '/workspace',
  '/workspace/agent',
  '/workspace/global',
  '/home/node/.claude',
  '/app/src',
];
const EXTRA_MOUNTS_DIR = '/workspace/extra';

const config = readConfig(process.env);
const sqlite3 = loadSqlite3();

let stopRequested = false;
let wakeFromSleep = null;

function readConfig(env) {
  const mode = env.AGENT_MODE || 'echo';
  if (mode !== 'echo' && mode !== 'contract-check') {
    fail(`invalid AGENT_MODE=${mode}: expected echo or contract-check`);
  }

  const exitAfter = env.AGENT_EXIT_AFTER_MS;
  const exitAfterMs = exitAfter === undefined || exitAfter === '' ? undefined : Number(exitAfter);
  if (exitAfterMs !== undefined && !(Number.isInteger(exitAfterMs) && exitAfterMs >= 0)) {
    fail(`invalid AGENT_EXIT_AFTER_MS=${exitAfter}: expected a whole number of milliseconds`);
  }

  const allocate = env.AGENT_ALLOCATE_MB;
  const allocateMb = allocate === undefined || allocate === '' ? undefined : Number(allocate);
  if (allocateMb !== undefined && !(Number.isInteger(allocateMb) && allocateMb > 0)) {
    fail(`invalid AGENT_ALLOCATE_MB=${allocate}: expected a positive whole number of MiB`);
  }

  return {
    inboundPath: env.SESSION_INBOUND_DB_PATH || '/workspace/inbound.db',
    outboundPath: env.SESSION_OUTBOUND_DB_PATH || '/workspace/outbound.db',
    heartbeatPath: env.SESSION_HEARTBEAT_PATH || '/workspace/.heartbeat',
    closeRequestPath: env.SESSION_CLOSE_REQUEST_PATH || '/workspace/.close-request',
    mode,
    heartbeat: env.AGENT_HEARTBEAT !== '0',
    ignoreCloseRequest: env.AGENT_IGNORE_CLOSE_REQUEST === '1',
    ignoreSigterm: env.AGENT_IGNORE_SIGTERM === '1',
    defaultSigterm: env.AGENT_DEFAULT_SIGTERM === '1',
    exitAfterMs,
    allocateMb,
    printMalformed: env.AGENT_PRINT_MALFORMED === '1',
    crashOnMessage: env.AGENT_CRASH_ON_MESSAGE === '1',
    hangOnMessage: env.AGENT_HANG_ON_MESSAGE === '1',
  };
}

function log(message) {
  process.stderr.write(`[agent] ${message}\n`);
}

function fail(message) {
  log(message);
  process.exit(2);
}

// Finds sqlite3 next to this file (npm install) or in Debian's module
// directories, which Debian's node does not search for ES modules.
function loadSqlite3() {
  const require = createRequire(import.meta.url);
  const multiarch = { x64: 'x86_64-linux-gnu', arm64: 'aarch64-linux-gnu' }[process.arch];
  const candidates = [
    'sqlite3',
    '/usr/share/nodejs/sqlite3',
    '/usr/lib/nodejs/sqlite3',
    ...(multiarch ? [`/usr/lib/${multiarch}/nodejs/sqlite3`] : []),
  ];

  for (const candidate of candidates) {
    let resolved;
    try {
      resolved = require.resolve(candidate);
    } catch (error) {
      if (error.code === 'MODULE_NOT_FOUND') continue;
      throw error;
    }
    return require(resolved);
  }
  fail(
    `sqlite3 module not found (looked for ${candidates.join(', ')}): install node-sqlite3 or npm install sqlite3`,
  );
}

// --- sqlite3 callback API as promises ---------------------------------------

function openDatabase(file, mode) {
  return new Promise((resolve, reject) => {
    const db = new sqlite3.Database(file, mode, (error) => (error ? reject(error) : resolve(db)));
  }).then((db) => {
    db.configure('busyTimeout', BUSY_TIMEOUT_MS);
    return db;
  });
}

function run(db, sql, params = []) {
  return new Promise((resolve, reject) => {
    db.run(sql, params, function onDone(error) {
      if (error) reject(error);
      else resolve(this.changes);
    });
  });
}

function all(db, sql, params = []) {
  return new Promise((resolve, reject) => {
    db.all(sql, params, (error, rows) => (error ? reject(error) : resolve(rows)));
  });
}

function execute(db, sql) {
  return new Promise((resolve, reject) => {
    db.exec(sql, (error) => (error ? reject(error) : resolve()));
  });
}

function closeDatabase(db) {
  return new Promise((resolve, reject) => {
    db.close((error) => (error ? reject(error) : resolve()));
  });
}

// Opens a file, runs work(db), and always closes the file again: a connection
// kept open across polls would keep a stale page cache of a bind-mounted file.
async function withDatabase(file, mode, work) {
  const db = await openDatabase(file, mode);
  try {
    return await work(db);
  } finally {
    await closeDatabase(db);
  }
}

function withOutbound(work) {
  return withDatabase(config.outboundPath, sqlite3.OPEN_READWRITE | sqlite3.OPEN_CREATE, async (db) => {
    await execute(db, 'PRAGMA journal_mode=DELETE');
    return work(db);
  });
}

async function inTransaction(db, work) {
  await execute(db, 'BEGIN IMMEDIATE');
  try {
    const result = await work();
    await execute(db, 'COMMIT');
    return result;
  } catch (error) {
    await execute(db, 'ROLLBACK');
    throw error;
  }
}

// --- session files ------------------------------------------------------------

function nowIso() {
  return new Date().toISOString();
}

function touchHeartbeat() {
  if (!config.heartbeat) return;
  const now = new Date();
  try {
    fs.utimesSync(config.heartbeatPath, now, now);
  } catch (error) {
    if (error.code !== 'ENOENT') throw error;
    fs.writeFileSync(config.heartbeatPath, '');
  }
}

function closeRequested() {
  return !config.ignoreCloseRequest && fs.existsSync(config.closeRequestPath);
}

function shouldStop() {
  return stopRequested || closeRequested();
}

// Returns the pending messages that this agent has not claimed yet, oldest
// first, or [] while the host has not created inbound.db.
async function readPendingMessages(outbound) {
  if (!fs.existsSync(config.inboundPath)) return [];

  const claimed = new Set(
    (await all(outbound, 'SELECT message_id FROM processing_ack')).map((row) => row.message_id),
  );
  const pending = await withDatabase(config.inboundPath, sqlite3.OPEN_READONLY, (inbound) =>
    all(
      inbound,
      `SELECT id, content, platform_id, channel_type, thread_id
         FROM messages_in
        WHERE status = 'pending'
          AND (process_after IS NULL OR julianday(process_after) <= julianday('now'))
        ORDER BY seq`,
    ),
  );
  return pending.filter((message) => !claimed.has(message.id));
}

function setAckStatus(outbound, messageId, status) {
  return run(outbound, 'UPDATE processing_ack SET status = ?, status_changed = ? WHERE message_id = ?', [
    status,
    nowIso(),
    messageId,
  ]);
}

// Returns the text field of a message's JSON content, or undefined when the
// content is not JSON or has no string text.
function messageText(content) {
  try {
    const parsed = JSON.parse(content);
    return parsed !== null && typeof parsed.text === 'string' ? parsed.text : undefined;
  } catch {
    return undefined;
  }
}

// --- replies ------------------------------------------------------------------

function isReportedEnv(name) {
  return REPORTED_ENV_NAMES.includes(name) || REPORTED_ENV_PREFIXES.some((prefix) => name.startsWith(prefix));
}

function describePath(path) {
  let writable = true;
  try {
    fs.accessSync(path, fs.constants.W_OK);
  } catch {
    writable = false;
  }
  return { exists: fs.existsSync(path), writable };
}

// Builds the contract-check report: the contract's environment variables,
// whether each mount exists and is writable, and the process's uid and gid.
function contractReport() {
  const env = {};
  for (const name of Object.keys(process.env).sort()) {
    if (isReportedEnv(name)) env[name] = process.env[name];
  }

  const extraMounts = fs.existsSync(EXTRA_MOUNTS_DIR)
    ? fs.readdirSync(EXTRA_MOUNTS_DIR).map((entry) => `${EXTRA_MOUNTS_DIR}/${entry}`)
    : [];
  const paths = {};
  for (const path of [...REPORTED_PATHS, ...extraMounts]) paths[path] = describePath(path);

  return { env, paths, uid: process.getuid(), gid: process.getgid() };
}

function replyText(text) {
  return config.mode === 'contract-check' ? JSON.stringify(contractReport()) : `echo: ${text}`;
}

function printOutputBlock(reply) {
  process.stdout.write(`${OUTPUT_START_MARKER}\n${JSON.stringify(reply)}\n${OUTPUT_END_MARKER}\n`);
}

// A block whose JSON is cut off, as an agent killed mid-write would leave it.
function printMalformedBlock() {
  process.stdout.write(
    `${OUTPUT_START_MARKER}\n{"id": "malformed", "content": {"text": \n${OUTPUT_END_MARKER}\n`,
  );
}

// Writes the replies to a message and completes its claim, in one transaction.
async function writeReplies(outbound, message, replies) {
  await inTransaction(outbound, async () => {
    for (const reply of replies) {
      const [row] = await all(outbound, 'SELECT MAX(seq) AS seq FROM messages_out WHERE seq % 2 = 1');
      const seq = row.seq === null ? 1 : row.seq + 2;
      await run(
        outbound,
        `INSERT INTO messages_out (id, seq, in_reply_to, timestamp, kind, platform_id, channel_type, thread_id, content)
         VALUES (?, ?, ?, ?, 'chat', ?, ?, ?, ?)`,
        [
          reply.id,
          seq,
          message.id,
          nowIso(),
          message.platform_id,
          message.channel_type,
          message.thread_id,
          JSON.stringify(reply.content),
        ],
      );
    }
    await setAckStatus(outbound, message.id, 'completed');
  });
}

function newReply(message, text) {
  return { id: randomUUID(), kind: 'chat', content: { text }, in_reply_to: message.id };
}

// Never resolves. The interval keeps Node's event loop alive, so the process
// keeps running with the claim open until a signal ends it.
function hangForever(message) {
  log(`hanging on message id=${message.id} (AGENT_HANG_ON_MESSAGE=1)`);
  return new Promise(() => {
    setInterval(() => undefined, 60_000);
  });
}

async function handleMessage(outbound, message) {
  await run(
    outbound,
    "INSERT INTO processing_ack (message_id, status, status_changed) VALUES (?, 'processing', ?)",
    [message.id, nowIso()],
  );

  const text = messageText(message.content);
  if (text === undefined) {
    await setAckStatus(outbound, message.id, 'failed');
    log(`message failed id=${message.id} reason="content is not JSON with a string text field"`);
    return;
  }

  if (config.crashOnMessage) {
    log(`exiting with code 3 before answering message id=${message.id} (AGENT_CRASH_ON_MESSAGE=1)`);
    process.exit(3);
  }
  if (config.hangOnMessage) await hangForever(message);

  const replies = [newReply(message, replyText(text))];
  printOutputBlock(replies[0]);
  if (config.printMalformed) {
    printMalformedBlock();
    replies.push(newReply(message, `${replyText(text)} (second reply)`));
    printOutputBlock(replies[1]);
  }
  try {
    await writeReplies(outbound, message, replies);
  } catch (error) {
    // Marks the claim failed so the host does not wait on it. The poll loop logs the cause.
    await setAckStatus(outbound, message.id, 'failed');
    log(`message failed id=${message.id} reason="writing the reply failed"`);
    throw error;
  }
  log(`message completed id=${message.id} replies=${replies.map((reply) => reply.id).join(',')}`);
}

// --- main loop ----------------------------------------------------------------

// The heartbeat is touched only while there is work, so an idle agent lets the
// host's idle timer run out. The host treats a stale heartbeat with no pending
// work as idle, not stuck.
async function poll() {
  await withOutbound(async (outbound) => {
    for (const message of await readPendingMessages(outbound)) {
      if (shouldStop()) return;
      touchHeartbeat();
      await handleMessage(outbound, message);
      touchHeartbeat();
    }
  });
}

// Allocates and fills megabytes one at a time, so that every page is resident
// and a memory limit below the total ends the process through the OOM killer.
function allocateMemory(megabytes) {
  log(`allocating ${megabytes} MiB (AGENT_ALLOCATE_MB)`);
  const buffers = [];
  for (let index = 0; index < megabytes; index++) {
    buffers.push(Buffer.alloc(1024 * 1024, (index % 255) + 1));
  }
  globalThis.agentAllocatedBuffers = buffers;
  log(`allocated ${megabytes} MiB`);
}

function sleep(ms) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    wakeFromSleep = () => {
      clearTimeout(timer);
      resolve();
    };
  });
}

function installSignalHandlers() {
  const onStopSignal = (signal) => {
    if (signal === 'SIGTERM' && config.ignoreSigterm) {
      log('ignoring SIGTERM (AGENT_IGNORE_SIGTERM=1)');
      return;
    }
    log(`received ${signal}, stopping after the current message`);
    stopRequested = true;
    if (wakeFromSleep) wakeFromSleep();
  };
  if (!config.defaultSigterm) process.on('SIGTERM', onStopSignal);
  process.on('SIGINT', onStopSignal);
}

async function main() {
  installSignalHandlers();
  if (config.exitAfterMs !== undefined) {
    setTimeout(() => {
      log(`exiting with code 3 after ${config.exitAfterMs} ms (AGENT_EXIT_AFTER_MS)`);
      process.exit(3);
    }, config.exitAfterMs);
  }

  if (config.allocateMb !== undefined) allocateMemory(config.allocateMb);

  await withOutbound((outbound) => execute(outbound, OUTBOUND_SCHEMA));
  log(`started mode=${config.mode} inbound=${config.inboundPath} outbound=${config.outboundPath}`);

  while (!shouldStop()) {
    try {
      await poll();
    } catch (error) {
      log(`poll failed: ${error.message}`);
    }
    if (!shouldStop()) await sleep(POLL_INTERVAL_MS);
  }

  log(stopRequested ? 'stopped on signal' : `stopped on close request ${config.closeRequestPath}`);
  process.exit(0);
}

main().catch((error) => {
  log(`fatal: ${error.stack || error.message}`);
  process.exit(1);
});
