import { InvalidTimestampError } from '../errors.js';

// No Node built-ins here: the workflow sandbox imports this module too.

/**
 * Date, `T` or space, time with optional seconds and fraction, optional zone.
 * Groups: year, month, day, hour, minute, second, fraction, zone.
 */
const TIMESTAMP_PATTERN =
  /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?\s*([Zz]|[+-]\d{2}(?::?\d{2})?)?$/;

const ZONE_PATTERN = /^([+-])(\d{2}):?(\d{2})?$/;

/**
 * Parses a timestamp as SQLite and ISO-8601 write it and returns epoch milliseconds.
 *
 * Accepts `2026-01-02 03:04:05` and `2026-01-02T03:04:05`, with optional seconds,
 * an optional fraction (digits past milliseconds are truncated), and an optional
 * zone `Z`, `+02`, `+02:00` or `-0530`. A timestamp without a zone is UTC, which is
 * what SQLite's `datetime('now')` writes, so the result does not depend on `TZ`.
 *
 * @throws InvalidTimestampError when the text does not match that format or names
 *   a date or time that does not exist (such as February 30 or hour 24).
 */
export function parseTimestamp(value: string): number {
  const match = TIMESTAMP_PATTERN.exec(value.trim());
  if (!match) {
    throw invalid(value, 'expected a format such as 2026-01-02 03:04:05 or 2026-01-02T03:04:05.123Z');
  }

  const [, year, month, day, hour, minute, second, fraction, zone] = match;
  const fields = {
    year: Number(year),
    month: Number(month),
    day: Number(day),
    hour: Number(hour),
    minute: Number(minute),
    second: Number(second ?? '0'),
    millisecond: Number((fraction ?? '').padEnd(3, '0').slice(0, 3)),
  };

  const localMs = utcMilliseconds(fields);
  if (localMs === null) {
    throw invalid(value, 'the date or time is out of range');
  }
  return localMs - zoneOffsetMs(value, zone);
}

/** Formats epoch milliseconds as ISO-8601 in UTC with a `Z` suffix, such as `2026-01-02T03:04:05.000Z`. */
export function formatTimestamp(ms: number): string {
  if (!Number.isFinite(ms)) {
    throw new InvalidTimestampError(
      `Cannot format ${ms} as a timestamp: expected finite epoch milliseconds.`,
    );
  }
  return new Date(ms).toISOString();
}

interface DateTimeFields {
  year: number;
  month: number;
  day: number;
  hour: number;
  minute: number;
  second: number;
  millisecond: number;
}

/** Returns the fields read as UTC in epoch ms, or null when any field is out of range. */
function utcMilliseconds(fields: DateTimeFields): number | null {
  if (fields.hour > 23 || fields.minute > 59 || fields.second > 59) {
    return null;
  }

  // setUTCFullYear keeps years 0-99 literal, where Date.UTC would map them to 1900-1999.
  const date = new Date(0);
  date.setUTCFullYear(fields.year, fields.month - 1, fields.day);
  date.setUTCHours(fields.hour, fields.minute, fields.second, fields.millisecond);

  // Date rolls invalid days over (February 30 becomes March 2), so compare back.
  const sameDay =
    date.getUTCFullYear() === fields.year &&
    date.getUTCMonth() === fields.month - 1 &&
    date.getUTCDate() === fields.day;
  return sameDay ? date.getTime() : null;
}

/** Returns how far the zone is ahead of UTC in ms, which is 0 for `Z` or no zone. */
function zoneOffsetMs(value: string, zone: string | undefined): number {
  if (zone === undefined || zone.toUpperCase() === 'Z') {
    return 0;
  }

  const match = ZONE_PATTERN.exec(zone);
  if (!match) {
    throw invalid(value, `the zone offset ${zone} is not in the form +HH:MM`);
  }
  const [, sign, hours, minutes] = match;
  const hourCount = Number(hours);
  const minuteCount = Number(minutes ?? '0');
  if (hourCount > 23 || minuteCount > 59) {
    throw invalid(value, `the zone offset ${zone} is out of range`);
  }

  const offset = (hourCount * 60 + minuteCount) * 60_000;
  return sign === '-' ? -offset : offset;
}

function invalid(value: string, reason: string): InvalidTimestampError {
  const excerpt = value.length > 64 ? `${value.slice(0, 64)}…` : value;
  return new InvalidTimestampError(`Invalid timestamp ${JSON.stringify(excerpt)}: ${reason}.`);
}
