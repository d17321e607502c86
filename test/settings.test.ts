import { describe, expect, it } from 'vitest';
import { loadSettings } from '../src/settings.js';

describe('settings', () => {
  it('history event limit defaults to 5000', () => {
    expect(loadSettings({}).historyEventLimit).toBe(5000);
  });

  it('history event limit reads the variable', () => {
    expect(loadSettings({ BERTH_HISTORY_EVENT_LIMIT: '800' }).historyEventLimit).toBe(800);
  });

  it.each(['10', '0', 'many'])('history event limit rejects %s', (value) => {
    expect(() => loadSettings({ BERTH_HISTORY_EVENT_LIMIT: value })).toThrow(/BERTH_HISTORY_EVENT_LIMIT/);
  });

  it('error names the value given', () => {
    expect(() => loadSettings({ BERTH_HISTORY_EVENT_LIMIT: 'abc' })).toThrow('(got "abc")');
  });

  it('empty variable counts as unset', () => {
    expect(loadSettings({ BERTH_HISTORY_EVENT_LIMIT: '' }).historyEventLimit).toBe(5000);
  });
});
