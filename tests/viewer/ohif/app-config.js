/** OHIF 3.13.2 configuration for the viewer tests: one DICOMweb source, same origin.
 *
 * Served as /app-config.js by tests/viewer/harness.py (OhifServer) in place of dist/app-config.js.
 * The server reverse-proxies /dicom-web/ to Orthanc's DICOMweb plugin, so every
 * request stays on http://127.0.0.1:<port>; no CORS, no external host.
 */
(function () {
  const root = window.location.origin + '/dicom-web';
  window.config = {
    name: 'lungsys-viewer-tests',
    routerBasename: null,
    extensions: [],
    modes: [],
    customizationService: {},
    showStudyList: true,
    maxNumberOfWebWorkers: 2,
    showWarningMessageForCrossOrigin: false,
    showCPUFallbackMessage: true,
    showLoadingIndicator: true,
    strictZSpacingForVolumeViewport: true,
    // The "investigational use" banner would otherwise cover the bottom of the screen.
    investigationalUseDialog: { option: 'never' },
    // Keep OHIF's default prompts (e.g. "load this segmentation?"): the driver (drive.mjs)
    // answers them, which is what a user does. Set true to auto-hydrate instead.
    disableConfirmationPrompts: false,
    maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
    showErrorDetails: 'always',
    defaultDataSourceName: 'orthanc',
    dataSources: [
      {
        namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
        sourceName: 'orthanc',
        configuration: {
          friendlyName: 'Orthanc (loopback)',
          name: 'orthanc',
          wadoUriRoot: root,
          qidoRoot: root,
          wadoRoot: root,
          qidoSupportsIncludeField: true,
          supportsReject: false,
          supportsStow: false,
          dicomUploadEnabled: false,
          imageRendering: 'wadors',
          thumbnailRendering: 'wadors',
          enableStudyLazyLoad: true,
          supportsFuzzyMatching: false,
          supportsWildcard: true,
          staticWado: false,
          omitQuotationForMultipartRequest: true,
          bulkDataURI: { enabled: true },
        },
      },
    ],
    // No httpErrorHandler that points at an external site.
    httpErrorHandler: error => {
      console.warn('lungsys-viewer httpError', error && error.status);
    },
  };
})();
