/** Returns the session workflow's ID, derived from the session ID alone so that every wake reaches one workflow. */
export function sessionWorkflowId(sessionId: string): string {
  return `berth-session-${sessionId}`;
}

/** Returns the image build workflow's ID, one per group and package set so that concurrent builds join. */
export function imageBuildWorkflowId(agentGroupId: string, tag: string): string {
  return `berth-image-${agentGroupId}-${tag.replace(/[^A-Za-z0-9_.-]/g, '-')}`;
}
