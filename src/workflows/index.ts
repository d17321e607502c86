export { sessionWorkflow } from './session.js';
export { imageBuildWorkflow } from './image-build.js';
